"""rdistill.blas: the OpenBLAS core type for faiss, chosen from CPU flags before faiss loads.

The checks that involve loading faiss run in fresh Python processes with their own environment (OPENBLAS_* removed,
then set per case): OpenBLAS reads OPENBLAS_CORETYPE only when it loads, and this process's faiss is loaded already.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rdistill.blas import MARK_ENV, OPENBLAS_0_3_15_CORETYPES, choose_coretype, read_cpuinfo

BASE = {"fpu", "sse", "sse2", "pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx"}
AVX2 = BASE | {"avx2", "fma", "bmi2", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


@pytest.mark.parametrize(
    ("flags", "vendor", "expected"),
    [
        (AVX512 | {"avx512_vnni"}, "GenuineIntel", "SkylakeX"),  # Cascade Lake
        (AVX512 | {"avx512_bf16", "amx_tile", "amx_bf16"}, "GenuineIntel", "SkylakeX"),  # Sapphire Rapids
        (AVX512 | {"avx512_bf16"}, "AuthenticAMD", "SkylakeX"),  # Zen 4
        (AVX2 | {"vaes"}, "AuthenticAMD", "Zen"),  # Zen 3
        (AVX2, "HygonGenuine", "Zen"),
        (AVX2, "GenuineIntel", "Haswell"),  # Alder Lake: AVX2, no AVX-512
        (AVX2, " GenuineIntel ", "Haswell"),
        (AVX2 | {"avx512f", "avx512cd", "avx512er", "avx512pf"}, "GenuineIntel", "Haswell"),  # Knights Landing
        (AVX512 - {"avx512vl"}, "GenuineIntel", "Haswell"),
        (AVX2 - {"fma"}, "GenuineIntel", None),
        (AVX2 - {"fma"}, "AuthenticAMD", None),
        (BASE, "GenuineIntel", None),  # Sandy Bridge: 0.3.15 knows it
        (set(), "", None),
    ],
)
def test_choose_coretype(flags, vendor, expected):
    assert choose_coretype(flags, vendor) == expected


def test_chosen_names_are_known_to_openblas_0_3_15():
    for flags, vendor in [(AVX512, "GenuineIntel"), (AVX2, "GenuineIntel"), (AVX2, "AuthenticAMD")]:
        assert choose_coretype(flags, vendor) in OPENBLAS_0_3_15_CORETYPES
    assert "Cooperlake" not in OPENBLAS_0_3_15_CORETYPES  # 0.3.15's lookup loop stops one short of it


def test_read_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpu0 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 fma avx512f\n\n"
    cpuinfo.write_text(cpu0 + cpu0.replace(": 0", ": 1").replace("avx512f", "sse"))
    assert read_cpuinfo(cpuinfo) == ({"fpu", "avx2", "fma", "avx512f"}, "GenuineIntel")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n")
    assert read_cpuinfo(arm) is None
    assert read_cpuinfo(tmp_path / "missing") is None


# One fresh process per case: configure (or not), import faiss, report the BLAS libraries, run a small knn.
CHILD = r"""
import json, os, sys
import numpy as np
first, out = sys.argv[1], sys.argv[2]
if first == "faiss":
    import faiss
import rdistill  # importing the package configures faiss's BLAS (rdistill/__init__.py)
from rdistill import blas
result = blas.configure_faiss_blas()
assert blas.configure_faiss_blas() == result
env = {k: os.environ.get(k) for k in (blas.CORETYPE_ENV, blas.MARK_ENV)}
import faiss
rng = np.random.default_rng(0)
xq = rng.standard_normal((2000, 96), dtype=np.float32)
xb = rng.standard_normal((500, 96), dtype=np.float32)
dist, idx = faiss.knn(xq, xb, 5)
np.savez(out, dist=dist, idx=idx)
summary = blas.faiss_blas_summary()
print(json.dumps({"result": result, "env": env, "kernel": blas.faiss_kernel(), **summary}))
"""


def _this_cpu_coretype():
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        pytest.skip("the core type is chosen only on x86-64 Linux")
    cpu = read_cpuinfo()
    chosen = choose_coretype(*cpu) if cpu else None
    if chosen is None:
        pytest.skip("this CPU has neither AVX2+FMA nor AVX-512: no core type is chosen")
    return chosen


def test_configure_in_fresh_processes_gives_the_chosen_kernel_and_the_same_knn(tmp_path):
    chosen = _this_cpu_coretype()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_") and k != MARK_ENV}
    cases = {
        "configured": ("rdistill", {}),
        "faiss first": ("faiss", {}),  # too late: OpenBLAS detects the CPU itself
        "user Prescott": ("rdistill", {"OPENBLAS_CORETYPE": "Prescott"}),  # kept, and it is the slow kernel
        # kept, but unknown to 0.3.15 (numpy's newer OpenBLAS maps it to SkylakeX: the child makes no numpy GEMM)
        "user Cooperlake": ("rdistill", {"OPENBLAS_CORETYPE": "Cooperlake"}),
        # inherited from an rdistill parent process (e.g. a shipped environment): chosen again from this CPU
        "inherited": ("rdistill", {"OPENBLAS_CORETYPE": "Prescott", MARK_ENV: "Prescott"}),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", CHILD, first, str(tmp_path / f"{i}.npz")],
            env={**clean, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, (name, (first, extra)) in enumerate(cases.items())
    }
    runs = {}
    for i, (name, proc) in enumerate(procs.items()):
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{stderr[-2000:]}"
        runs[name] = json.loads(stdout.strip().splitlines()[-1])
        runs[name]["knn"] = np.load(tmp_path / f"{i}.npz")
    if not runs["configured"]["faiss"] or runs["configured"]["faiss"][0]["internal_api"] != "openblas":
        pytest.skip(f"faiss bundles no OpenBLAS here: {runs['configured']['libraries']}")

    def faiss_arch(name):
        return runs[name]["faiss"][0]["architecture"]

    configured = runs["configured"]
    assert configured["result"]["source"] == "cpu flags" and configured["result"]["coretype"] == chosen
    assert configured["env"] == {"OPENBLAS_CORETYPE": chosen, MARK_ENV: chosen}
    assert configured["expected"] == chosen
    assert faiss_arch("configured").lower() == chosen.lower()
    assert configured["kernel"].lower().endswith(f" {chosen.lower()}")

    assert runs["faiss first"]["result"]["source"] == "too late"
    assert runs["faiss first"]["env"] == {"OPENBLAS_CORETYPE": None, MARK_ENV: None}

    assert runs["user Prescott"]["result"]["source"] == "user"
    assert runs["user Prescott"]["env"]["OPENBLAS_CORETYPE"] == "Prescott"
    assert faiss_arch("user Prescott") == "Prescott"

    cooperlake = runs["user Cooperlake"]
    assert cooperlake["result"]["source"] == "user" and "does not know" in cooperlake["result"]["detail"]
    if cooperlake["faiss"][0]["version"] == "0.3.15":
        assert faiss_arch("user Cooperlake") == "Prescott"  # "Core not found": 0.3.15 falls back to Prescott

    assert runs["inherited"]["result"]["source"] == "cpu flags"
    assert faiss_arch("inherited").lower() == chosen.lower()

    # numpy's own OpenBLAS is loaded before the variable is set, so it keeps its own detection
    numpy_arch = {
        name: [r["architecture"] for r in run["libraries"] if r["package"] == "numpy"] for name, run in runs.items()
    }
    assert numpy_arch["configured"] == numpy_arch["faiss first"]

    # Same neighbours whatever the kernel; distances equal to float32 rounding (kernels sum in different orders)
    ref = runs["configured"]["knn"]
    for name in ("faiss first", "user Prescott", "user Cooperlake", "inherited"):
        np.testing.assert_array_equal(runs[name]["knn"]["idx"], ref["idx"], err_msg=name)
        np.testing.assert_allclose(runs[name]["knn"]["dist"], ref["dist"], rtol=1e-5, err_msg=name)
