"""Element-wise work on large row blocks, split over this process's cores.

numpy's casts and reductions run on one core and release the GIL, so a block's float16 -> float32 conversion and
its L2 normalisation split into row ranges run on threads in parallel (2x on 2 cores, measured on a 65536 x 768
block). The float16 conversion itself goes through FAISS's fp16 decoder (:func:`to_float32`): 1.53x numpy's cast
over a 1M-row store on 2 threads (``python -m rdistill.dev.bench_read``), bit for bit the same. The thread count is
this process's CPU allowance: ``OMP_NUM_THREADS`` when set (Ray sets it to a task's ``num_cpus`` in its workers, so
a one-CPU task stays on one thread), else the CPUs this process may run on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_MIN_ROWS = 4096  # below this a block is not split: the threads' hand-off would cost more than it saves
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def row_threads() -> int:
    """How many threads element-wise row work may use in this process."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def for_row_ranges(fn: Callable[[int, int], None], n: int) -> None:
    """``fn(r0, r1)`` over consecutive row ranges covering ``[0, n)``, on up to :func:`row_threads` threads; the
    ranges are disjoint, so ``fn`` may write its rows of a shared output. Exceptions are raised here."""
    global _pool, _pool_size
    t = min(row_threads(), max(1, n // _MIN_ROWS))
    if t <= 1:
        fn(0, n)
        return
    if _pool is None or _pool_size < t:
        _pool = ThreadPoolExecutor(max_workers=t, thread_name_prefix="rdistill-rows")
        _pool_size = t
    step = -(-n // t)
    for f in [_pool.submit(fn, r0, min(r0 + step, n)) for r0 in range(0, n, step)]:
        f.result()


_half_decoders: dict = {}


def _half_decoder(dim: int):
    """A FAISS fp16 scalar quantizer of ``dim`` components: its decoder converts float16 to float32 with the CPU's
    conversion instructions (F16C in the AVX2 build) where numpy's cast converts one value at a time."""
    if dim not in _half_decoders:
        import faiss  # noqa: PLC0415  (rdistill configured faiss's BLAS when it was imported)

        sq = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)
        sq.train(np.zeros((1, dim), dtype=np.float32))  # fp16 has nothing to learn; this marks it trained
        _half_decoders[dim] = (faiss, sq)
    return _half_decoders[dim]


def to_float32(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``src`` (n, d) float16 or float32 into ``out`` (n, d) float32, on this process's cores; returns ``out``.
    Every float16 bit pattern (NaN, infinities and subnormals included) converts as numpy's cast does."""
    n = src.shape[0]
    if out.shape != src.shape or out.dtype != np.float32:
        raise ValueError(f"to_float32: out is {out.dtype} {out.shape}, needs float32 {src.shape}")
    plain = src.flags.c_contiguous and out.flags.c_contiguous  # FAISS reads and writes raw row-major memory
    if src.dtype == np.float16 and src.ndim == 2 and src.shape[1] > 0 and plain and n:
        faiss, sq = _half_decoder(src.shape[1])
        codes = src.view(np.uint8)

        def work(r0: int, r1: int) -> None:
            sq.decode_c(faiss.swig_ptr(codes[r0:r1]), faiss.swig_ptr(out[r0:r1]), r1 - r0)

    else:
        return cast_float32(src, out)

    for_row_ranges(work, n)
    return out


def cast_float32(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``src`` into ``out`` (float32) by numpy's cast, on this process's cores: :func:`to_float32`'s way for
    what FAISS cannot read (float32, non-contiguous arrays), and the baseline it is measured against."""
    for_row_ranges(lambda r0, r1: np.copyto(out[r0:r1], src[r0:r1], casting="unsafe"), src.shape[0])
    return out
