"""``python -m rdistill.distill``: entry point of the optimisation-based methods (:mod:`rdistill.methods.driver`)."""

import sys

from rdistill.methods.driver import main

if __name__ == "__main__":
    sys.exit(main())
