"""``python -m rdistill.evaluate``: the entry point of the evaluation harness (:mod:`rdistill.eval.driver`)."""

import sys

from rdistill.eval.driver import main

if __name__ == "__main__":
    sys.exit(main())
