"""The PDS prototype engine: streaming passes over an embedding store, and the driver that runs them."""

from rdistill.engine.driver import run_prototypes

__all__ = ["run_prototypes"]
