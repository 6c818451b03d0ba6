"""``python -m rdistill.synthesize``: the entry point of :mod:`rdistill.stages.synthesize.driver`."""

import sys

from rdistill.stages.synthesize.driver import main

if __name__ == "__main__":
    sys.exit(main())
