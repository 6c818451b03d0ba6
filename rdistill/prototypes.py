"""``python -m rdistill.prototypes``: the entry point of the prototype engine (:mod:`rdistill.engine.driver`)."""

import sys

from rdistill.engine.driver import main

if __name__ == "__main__":
    sys.exit(main())
