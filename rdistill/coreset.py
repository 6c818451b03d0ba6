"""``python -m rdistill.coreset``: the entry point of the coreset baselines (:mod:`rdistill.baselines.driver`)."""

import sys

from rdistill.baselines.driver import main

if __name__ == "__main__":
    sys.exit(main())
