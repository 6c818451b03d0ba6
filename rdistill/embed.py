"""``python -m rdistill.embed``: the entry point of the embedding stage (:mod:`rdistill.stages.embed.driver`)."""

import sys

from rdistill.stages.embed.driver import main

if __name__ == "__main__":
    sys.exit(main())
