"""``python -m rdistill.pds``: the entry point of the job (:mod:`rdistill.stages.pds`)."""

import sys

from rdistill.stages.pds import main

if __name__ == "__main__":
    sys.exit(main())
