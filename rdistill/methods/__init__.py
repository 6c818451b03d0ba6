"""Optimisation-based distillation methods PDS is compared with (``python -m rdistill.distill``): trajectory
matching (MTT-VL, TESLA-VL, LoRS: :mod:`rdistill.methods.trajectory`), CovMatch and MDM; the framework they share
is :mod:`rdistill.methods.common` (the interface) and :mod:`rdistill.methods.driver` (the command)."""
