"""rdistill: Ray-distributed prototype-guided distillation of image-text datasets."""

from rdistill.blas import configure_faiss_blas

__version__ = "0.1.0"

# Before anything here imports faiss, in this process and in every Ray worker (they import rdistill to run our
# tasks): faiss's bundled OpenBLAS then runs the fastest kernel this CPU has (rdistill.blas).
configure_faiss_blas()
