"""Which BLAS kernel faiss runs: OpenBLAS's core type chosen in each process from its own CPU, before faiss loads.

faiss-cpu wheels bundle their own OpenBLAS (0.3.15 in faiss-cpu 1.15.1, ``faiss_cpu.libs/libopenblaso-*.so``). It
picks its kernel from the CPU's family and model, and that table predates many current CPUs: Ice Lake server,
Sapphire/Emerald/Granite Rapids, Alder/Raptor Lake (Intel) and Zen 5 (AMD) are unknown to it, and it then runs its
Prescott (SSE3) or Barcelona kernel. faiss's exact searches are GEMMs, so this costs up to 4x: measured on a recent
Xeon, ``faiss.knn`` 65536 x 768 by 1000 x 768 runs at ~60 GFLOP/s on Prescott and ~250 on SkylakeX, with the same
results. The environment variable ``OPENBLAS_CORETYPE`` overrides the table, but each OpenBLAS reads it once, when it
is loaded, and does not check it: a core type whose instructions this CPU lacks dies with SIGILL at the first GEMM.
So no job-wide value will do on a mixed cluster: :func:`configure_faiss_blas` runs in every process (the driver and
each Ray worker) before faiss is imported there, and chooses from that machine's own ``/proc/cpuinfo``.

numpy and scipy bundle newer OpenBLAS builds that detect these CPUs correctly. They read the same variable when they
load: :func:`configure_faiss_blas` imports numpy first, so numpy in this process is left to its own detection; an
OpenBLAS loaded later (scipy's, or numpy's in a child process that inherits the variable) follows it, and the value
chosen here is a kernel of the same family those builds pick themselves for this CPU (their Zen target is built from
the Haswell kernels).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CORETYPE_ENV = "OPENBLAS_CORETYPE"
# The value this module set, so that a process which inherits both (a Ray worker of a local instance, a
# subprocess) re-derives the choice from its own CPU instead of taking it for the user's.
MARK_ENV = "RDISTILL_OPENBLAS_CORETYPE"

# Core names OpenBLAS 0.3.15 accepts in OPENBLAS_CORETYPE (driver/others/dynamic.c, ``corename``, compared
# case-insensitively). Its ``force_coretype`` loop stops at index 24, so "Cooperlake" (index 25) is refused too:
# "Core not found", and the library falls back to Prescott. Names of later releases (SapphireRapids, ...) likewise.
OPENBLAS_0_3_15_CORETYPES = frozenset(
    {
        "Katmai", "Coppermine", "Northwood", "Prescott", "Banias", "Atom", "Core2", "Penryn", "Dunnington",
        "Nehalem", "Athlon", "Opteron", "Opteron_SSE3", "Barcelona", "Nano", "Sandybridge", "Bobcat", "Bulldozer",
        "Piledriver", "Haswell", "Steamroller", "Excavator", "Zen", "SkylakeX",
    }
)  # fmt: skip

# The SkylakeX kernels are compiled with -march=skylake-avx512 (AVX-512 F, CD, BW, DQ, VL) on top of the Haswell
# ones (AVX2, FMA). Linux lists an AVX-512 flag only when the kernel also saves the zmm state.
_AVX2 = frozenset({"avx2", "fma"})
_AVX512 = _AVX2 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
_AMD_VENDORS = frozenset({"AuthenticAMD", "HygonGenuine"})  # OpenBLAS treats Hygon (Zen-based) as AMD
_NEEDS = {"SkylakeX": _AVX512, "Cooperlake": _AVX512, "Haswell": _AVX2, "Zen": _AVX2}

_result: dict | None = None  # what the first configure_faiss_blas() call in this process did


def choose_coretype(cpuinfo_flags: set[str], vendor: str) -> str | None:
    """The OpenBLAS 0.3.15 core type for a CPU, or None to leave OpenBLAS to its own detection.

    ``cpuinfo_flags``: the ``flags`` of ``/proc/cpuinfo`` (``{"avx2", "fma", "avx512f", ...}``); ``vendor``: its
    ``vendor_id`` (``"GenuineIntel"``, ``"AuthenticAMD"``, ``"HygonGenuine"``). AVX-512 (F, CD, BW, DQ, VL) gives
    SkylakeX, whatever the vendor (Zen 4 and 5 included, as newer OpenBLAS releases choose; OpenBLAS 0.3.15 knows no
    later name); otherwise AVX2 with FMA gives Zen on AMD and Hygon, Haswell elsewhere. Older CPUs give None: 0.3.15
    already knows them, and no faster kernel of its would run on them.
    """
    flags = set(cpuinfo_flags)
    if _AVX512 <= flags:
        return "SkylakeX"
    if _AVX2 <= flags:
        return "Zen" if vendor.strip() in _AMD_VENDORS else "Haswell"
    return None


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> tuple[set[str], str] | None:
    """``(flags, vendor_id)`` of the first processor listed in ``path``, or None where it cannot be read or lists
    no x86 ``flags`` (another OS, an ARM CPU)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    flags, vendor = None, ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key == "flags" and flags is None:
            flags = set(value.split())
        elif sep and key == "vendor_id" and not vendor:
            vendor = value.strip()
        if flags is not None and vendor:
            break
    return None if flags is None else (flags, vendor)


def _this_cpu() -> tuple[set[str], str] | None:
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return read_cpuinfo()


def configure_faiss_blas() -> dict:
    """Set ``OPENBLAS_CORETYPE`` for this CPU so that faiss's bundled OpenBLAS runs its fast kernel; call it in
    every process before faiss is first imported there. Idempotent: later calls return the first call's result.

    A value the user set is kept (an empty one counts as unset: OpenBLAS would read it as an unknown name and run
    Prescott). A value inherited from an rdistill parent process is chosen again from this CPU. Nothing is set where
    the CPU is unknown (not x86-64 Linux, or neither AVX2 nor AVX-512), nor once faiss is loaded.

    Returns ``{"coretype": str | None, "source": "user" | "cpu flags" | "unknown cpu" | "too late", "detail": str}``,
    ``coretype`` being the value in the environment when it returns. Which kernel a loaded library runs is
    :func:`blas_report`'s to say.
    """
    global _result
    if _result is None:
        _result = r = _configure()
        quiet = r["source"] in ("cpu flags", "unknown cpu") or r["detail"] == "kept"
        level = logging.INFO if quiet else logging.WARNING
        log.log(level, "faiss BLAS: %s=%s (%s): %s", CORETYPE_ENV, r["coretype"], r["source"], r["detail"])
    return dict(_result)


def _configure() -> dict:
    current = os.environ.get(CORETYPE_ENV) or None
    if "faiss" in sys.modules:
        return _outcome(current, "too late", "faiss was imported first; its OpenBLAS chose its kernel when it loaded")
    ours = current is not None and os.environ.get(MARK_ENV) == current
    cpu = _this_cpu()
    if current is not None and not ours:
        return _outcome(current, "user", _check_user_value(current, cpu))
    if "numpy" not in sys.modules:
        import numpy  # noqa: F401  (its OpenBLAS loads now, before the variable is set, and detects this CPU itself)
    chosen = choose_coretype(*cpu) if cpu is not None else None
    if chosen is None:
        os.environ.pop(CORETYPE_ENV, None)
        os.environ.pop(MARK_ENV, None)
        what = "no x86 flags in /proc/cpuinfo" if cpu is None else "neither AVX2 nor AVX-512"
        return _outcome(None, "unknown cpu", f"{what}: OpenBLAS detects the CPU itself")
    os.environ[CORETYPE_ENV] = os.environ[MARK_ENV] = chosen
    return _outcome(chosen, "cpu flags", f"{(cpu[1] or 'unknown vendor')} with {_flag_summary(cpu[0])}")


def _outcome(coretype: str | None, source: str, detail: str) -> dict:
    return {"coretype": coretype, "source": source, "detail": detail}


def _flag_summary(flags: set[str]) -> str:
    return "AVX-512" if _AVX512 <= flags else "AVX2+FMA" if _AVX2 <= flags else "neither AVX2 nor AVX-512"


def _check_user_value(value: str, cpu: tuple[set[str], str] | None) -> str:
    names = {n.lower(): n for n in OPENBLAS_0_3_15_CORETYPES}
    if value.lower() not in names:
        return f"kept; OpenBLAS 0.3.15 (faiss-cpu 1.15) does not know {value!r} and runs Prescott"
    needs = _NEEDS.get(names[value.lower()], frozenset())
    if cpu is not None and not needs <= cpu[0]:
        return f"kept; this CPU lacks {', '.join(sorted(needs - cpu[0]))}: expect SIGILL at the first GEMM"
    return "kept"


def blas_report() -> list[dict]:
    """The BLAS libraries loaded in this process, as threadpoolctl sees them: one dict per library with
    ``package`` (the wheel's folder, e.g. ``faiss_cpu`` or ``numpy``), ``library`` (file name), ``internal_api``
    (``openblas``, ``mkl``, ...), ``version``, ``architecture`` (the kernel OpenBLAS runs, e.g. ``SkylakeX``) and
    ``num_threads``. Empty when threadpoolctl is not installed. Call it after faiss is imported.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        log.warning("threadpoolctl is not installed: cannot tell which BLAS kernels run")
        return []
    rows = []
    for info in threadpool_info():
        if info.get("user_api") != "blas":
            continue
        path = Path(info.get("filepath") or "")
        package = path.parent.name.removesuffix(".libs")
        if package == "lib":  # scipy_openblas32/lib/libscipy_openblas.so and the like
            package = path.parent.parent.name
        rows.append(
            {
                "package": package,
                "library": path.name,
                "internal_api": info.get("internal_api"),
                "version": info.get("version"),
                "architecture": info.get("architecture"),
                "num_threads": info.get("num_threads"),
            }
        )
    return rows


def faiss_kernel() -> str | None:
    """One line for a log or a per-task record, e.g. ``"openblas 0.3.15 SkylakeX"``: the BLAS that faiss's wheel
    bundles (found by its ``faiss*.libs`` folder) and the kernel it runs; None before faiss is imported, or when faiss
    uses a BLAS of another package (conda builds). About a millisecond."""
    rows = [row for row in blas_report() if row["package"].startswith("faiss")]
    return ", ".join(f"{r['internal_api']} {r['version']} {r['architecture']}" for r in rows) or None


def faiss_blas_summary() -> dict:
    """For the log and ``summary.json``, after faiss is imported: ``{"configured": configure_faiss_blas()'s result,
    "expected": the core type chosen for this CPU (or None), "faiss": faiss's BLAS entries of blas_report(),
    "libraries": all of blas_report()}``. Warns when faiss's OpenBLAS runs another kernel than the one expected."""
    configured = configure_faiss_blas()
    cpu = _this_cpu()
    expected = choose_coretype(*cpu) if cpu is not None else None
    libraries = blas_report()
    faiss_libs = [row for row in libraries if row["package"].startswith("faiss")]
    for row in faiss_libs:
        arch = row["architecture"]
        if expected is not None and configured["source"] != "user" and (arch or "").lower() != expected.lower():
            log.warning(
                "faiss's %s %s runs its %s kernel, not %s: set %s=%s before faiss is imported (see rdistill.blas)",
                row["internal_api"], row["version"], arch, expected, CORETYPE_ENV, expected,
            )  # fmt: skip
    return {"configured": configured, "expected": expected, "faiss": faiss_libs, "libraries": libraries}
