"""Output safety: file modes follow the umask, data is fsynced and renamed before its marker, the output lock,
the change descriptions a refused rerun prints, and the one error policy of every command."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rdistill.cli import add_common_args, run_cli
from rdistill.errors import ConfigError, RunError
from rdistill.io import outputs
from rdistill.io.outputs import DoneMarkers, atomic_path, atomic_write_json, describe_changes, lock_output
from rdistill.stages.parts import PartAssembler

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask():
    """Set the process umask for a test, restore it after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_get_the_umask_mode_not_mkstemp_0600(tmp_path, umask, mask):
    umask(mask)
    atomic_write_json(tmp_path / "a" / "summary.json", {"x": 1})
    with atomic_path(tmp_path / "a" / "part.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.zeros(3))
    for name in ("summary.json", "part.npy"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o666 & ~mask
    assert outputs.umask() == mask


def test_a_part_is_fsynced_and_renamed_before_its_marker(tmp_path, monkeypatch):
    """The order of the calls that make a unit durable: each file's data fsynced, renamed, its directory fsynced;
    only then the done-marker, the same way."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(("fsync-dir" if os.path.isdir(target) else "fsync", Path(target).name))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("rename", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def write(unit, cols):
        for name in ("a.npy", "b.npy"):
            with atomic_path(tmp_path / "data" / f"{unit}-{name}") as tmp, open(tmp, "wb") as f:
                np.save(f, cols["x"])
        return {"unit": unit, "rows": len(cols["pos"])}

    asm = PartAssembler("test", DoneMarkers(tmp_path, "part"), write, str, expected={0: 3})
    asm.add(0, {"pos": np.array([2, 0]), "x": np.array([20, 0])})
    assert calls == []  # incomplete: nothing written
    asm.add(0, {"pos": np.array([1]), "x": np.array([10])})
    names = [(kind, name.split(".tmp")[0].lstrip(".").rsplit(".", 1)[0] if kind == "fsync" else name)
             for kind, name in calls]  # fmt: skip
    assert names == [
        ("fsync", "0-a.npy"), ("rename", "0-a.npy"), ("fsync-dir", "data"),
        ("fsync", "0-b.npy"), ("rename", "0-b.npy"), ("fsync-dir", "data"),
        ("fsync", "part_0.json"), ("rename", "part_0.json"), ("fsync-dir", "_done"),
    ]  # fmt: skip
    assert np.load(tmp_path / "data" / "0-a.npy").tolist() == [0, 10, 20]  # rows in pos order
    assert json.loads((tmp_path / "_done" / "part_0.json").read_text()) == {"unit": 0, "rows": 3}


def test_second_holder_of_an_output_is_refused_and_a_dead_holder_frees_it(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rdistill.io.outputs import lock_output\n"
         "with lock_output(sys.argv[1]):\n print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"{out} is in use by another rdistill run \(pid {holder.pid} on"):
            with lock_output(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with lock_output(out):  # the kernel dropped the killed holder's lock
        with pytest.raises(RunError, match="in use"):  # and one process cannot take it twice either
            with lock_output(out):
                pass


def test_changes_name_the_file_and_the_key():
    old = {"input": {"img_emb/img_emb_3.npy": {"size": 10, "version": 1}, "x.npy": {"size": 1, "version": 1}},
           "config": {"prune": {"ratio": 0.2}, "seed": 0}}  # fmt: skip
    new = {"input": {"img_emb/img_emb_3.npy": {"size": 12, "version": 2}, "y.npy": {"size": 1, "version": 1}},
           "config": {"prune": {"ratio": 0.3}, "seed": 0}}  # fmt: skip
    text = describe_changes(old, new, ("input", "config"))
    assert text.startswith("input img_emb/img_emb_3.npy: rewritten (size 10 -> 12, version 1 -> 2)")
    assert "config prune.ratio: 0.2 -> 0.3" in text and "(and 1 more)" in text and "seed" not in text
    assert describe_changes(old, old, ("input", "config")) == ""


def _cli(run):
    import argparse

    p = argparse.ArgumentParser()
    add_common_args(p)
    return lambda argv: run_cli(p, argv, run, lambda s: print("done"))


def test_bad_input_is_one_line_and_exit_2_but_a_bug_keeps_its_traceback(capsys):
    def bad(args, cfg):
        raise ConfigError("cluster.num_pairs: -1 is below the minimum 1")

    assert _cli(bad)([]) == 2
    err = capsys.readouterr().err
    assert err == "error: cluster.num_pairs: -1 is below the minimum 1\n"

    def bug(args, cfg):
        return {}["missing"]

    with pytest.raises(KeyError):  # no catch-all: an internal error is not reported as bad input
        _cli(bug)([])
