"""Resume by content, unfinished upstreams, the job's error policy, and a kill between a part's rename and its
done-marker."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rdistill.config import load_config
from rdistill.dev.toydata import toy_samples, write_tar
from rdistill.engine import run_prototypes
from rdistill.errors import InputError, RunError
from rdistill.stages import pds
from rdistill.stages.embed.driver import run_embed
from rdistill.stages.synthesize.driver import run_synthesize

ROOT = Path(__file__).resolve().parents[2]


def cfg(*over):
    return load_config(None, ["progress=false", "cluster.num_pairs=20", *over])


def _rewrite_in_place(path: Path) -> None:
    """The same bytes written again, as a re-embedding into the same store does: only the mtime changes."""
    data = path.read_bytes()
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_store_changed_in_place_is_not_reported_done(store_copy, tmp_path, capsys):
    root, _ = store_copy
    out = tmp_path / "out"
    run_prototypes(str(root), out, cfg())
    assert run_prototypes(str(root), out, cfg())["resumed"] is True  # unchanged: done
    _rewrite_in_place(root / "text_emb" / "text_emb_1.npy")
    with pytest.raises(RunError, match=r"changed since: input text_emb/text_emb_1.npy: rewritten .*--overwrite"):
        run_prototypes(str(root), out, cfg())
    again = run_prototypes(str(root), out, cfg(), overwrite=True)
    assert "resumed" not in again and (out / "_SUCCESS").exists()
    # a new part is a change too; the job reports it in one line, exit code 2
    shutil.copy(root / "img_emb" / "img_emb_0.npy", root / "img_emb" / "img_emb_9.npy")
    shutil.copy(root / "text_emb" / "text_emb_0.npy", root / "text_emb" / "text_emb_9.npy")
    shutil.copy(root / "metadata" / "metadata_0.parquet", root / "metadata" / "metadata_9.parquet")
    rc = pds.main(["--embeddings", str(root), "--output", str(tmp_path / "job"), "--quiet", "--set",
                   "job.synthesize=false", "--set", "cluster.num_pairs=20"])  # fmt: skip
    assert rc == 0
    shutil.copy(root / "img_emb" / "img_emb_1.npy", root / "img_emb" / "img_emb_9.npy")
    rc = pds.main(["--embeddings", str(root), "--output", str(tmp_path / "job"), "--quiet", "--set",
                   "job.synthesize=false", "--set", "cluster.num_pairs=20"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "input img_emb/img_emb_9.npy: rewritten" in err and err.count("\n") == 1


def test_unfinished_embedding_run_is_refused_unless_allowed(store_copy, tmp_path, capsys):
    root, _ = store_copy
    # a store of ours whose embedding run was killed while writing part 2: parts 0 and 1 have their done-markers,
    # part 2 has its arrays but not yet its metadata, and there is no _SUCCESS
    (root / "embed.json").write_text("{}")
    (root / "_done").mkdir()
    for i in (0, 1):
        (root / "_done" / f"part_{i}.json").write_text("{}")
    (root / "metadata" / "metadata_2.parquet").unlink()
    args = ["--embeddings", str(root), "--output", str(tmp_path / "o"), "--num-pairs", "20", "--quiet"]
    from rdistill.engine.driver import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert "embedding run that writes this store has not finished (no _SUCCESS; 2 parts done)" in err
    assert "--allow-incomplete" in err and err.count("\n") == 1
    assert main([*args, "--allow-incomplete"]) == 0  # only the finished parts are read
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["input"]["incomplete"] is True and summary["counts"]["rows"] == 8000
    # once the run finishes (part 2 complete), the prototypes made from two parts are not taken as done
    shutil.copy(root / "metadata" / "metadata_1.parquet", root / "metadata" / "metadata_2.parquet")
    (root / "_SUCCESS").write_text("")
    with pytest.raises(RunError, match="changed since: input img_emb/img_emb_2.npy: added"):
        run_prototypes(str(root), tmp_path / "o", cfg())


def test_failed_run_does_not_block_the_corrected_rerun(planted_store, tmp_path):
    root, _ = planted_store
    out = tmp_path / "o"
    with pytest.raises(RunError, match="larger than the 9600 pairs kept"):
        run_prototypes(str(root), out, cfg("cluster.num_pairs=100000"))
    assert run_prototypes(str(root), out, cfg())["prototypes"]["count"] == 20  # nothing finished: nothing to keep


def test_output_of_an_older_version_is_not_silently_replaced(planted_store, tmp_path):
    root, _ = planted_store
    out = tmp_path / "o"
    run_prototypes(str(root), out, cfg())
    (out / "prototypes.json").unlink()  # as rdistill 0.1.0 left its outputs: no run record
    with pytest.raises(RunError, match="without a run record of this rdistill version .*pass --overwrite"):
        run_prototypes(str(root), out, cfg())
    assert run_prototypes(str(root), out, cfg(), overwrite=True)["prototypes"]["count"] == 20


def test_synthesize_refuses_unfinished_prototypes(planted_store, tmp_path):
    root, _ = planted_store
    protos = tmp_path / "p"
    run_prototypes(str(root), protos, cfg())
    (protos / "_SUCCESS").unlink()  # as a prototypes run killed after writing its table
    with pytest.raises(RunError, match=r"p: the prototypes run that writes it has not finished .*--allow-incomplete"):
        run_synthesize(protos, tmp_path / "d", load_config("configs/demo.yaml"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--embeddings", "{tmp}/nowhere"], "{tmp}/nowhere: embedding store not found"),
        (["--input", "{tmp}/nowhere"], "{tmp}/nowhere: no such file or directory"),
        (["--embeddings", "{tmp}/bad"], "{tmp}/bad/img_emb/img_emb_0.npy: not a readable .npy file"),
        (["--embeddings", "{tmp}/empty"], "{tmp}/empty: the store holds no rows (all 1 parts are empty)"),
        (["--embeddings", "{tmp}/bad", "--set", "cluster.num_pair=3"], "unknown config key cluster.num_pair"),
    ],
)
def test_job_reports_bad_input_in_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "bad" / "img_emb").mkdir(parents=True)
    (tmp_path / "bad" / "img_emb" / "img_emb_0.npy").write_bytes(b"not numpy")
    for sub in ("text_emb", "metadata"):
        (tmp_path / "bad" / sub).mkdir()
    np.save(tmp_path / "bad" / "text_emb" / "text_emb_0.npy", np.zeros((2, 4), np.float16))
    import pyarrow as pa

    for name in ("img_emb", "text_emb", "metadata"):
        (tmp_path / "empty" / name).mkdir(parents=True)
    np.save(tmp_path / "empty" / "img_emb" / "img_emb_0.npy", np.zeros((0, 4), np.float16))
    np.save(tmp_path / "empty" / "text_emb" / "text_emb_0.npy", np.zeros((0, 4), np.float16))
    pq.write_table(pa.table({"key": pa.array([], pa.string()), "caption": pa.array([], pa.string())}),
                   tmp_path / "empty" / "metadata" / "metadata_0.parquet")  # fmt: skip
    pq.write_table(pa.table({"key": ["a", "b"], "caption": ["x", "y"]}), tmp_path / "bad" / "metadata" /
                   "metadata_0.parquet")  # fmt: skip
    rc = pds.main([a.format(tmp=tmp_path) for a in argv] + ["--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1


def test_kill_between_a_parts_rename_and_its_marker_redoes_the_part(ray_local, tmp_path):
    d = tmp_path / "shards"
    for k in range(3):
        write_tar(d / f"s-{k}.tar", toy_samples(20, seed=40 + k, start=k * 100))
    out = tmp_path / "emb"
    tiny = ["embed.model=rdistill-tiny", "embed.pretrained=", "embed.batch_size=16", "progress=false"]
    cli = [sys.executable, "-m", "rdistill.embed", "--input", str(d), "--output", str(out), "--quiet",
           *sum((["--set", s] for s in tiny), [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    killed = subprocess.run(cli, env={**env, "RDISTILL_FAULT_KILL_AFTER": "embed.published:2"}, cwd=ROOT,
                            timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    # part 1's files are in place, but its marker was never written: it is not done
    assert [p.name for p in (out / "_done").glob("*.json")] == ["part_0.json"]
    assert (out / "img_emb" / "img_emb_1.npy").exists() and (out / "metadata" / "metadata_1.parquet").exists()
    stamp = (out / "_done" / "part_0.json").stat().st_mtime_ns
    subprocess.run(cli, env=env, cwd=ROOT, timeout=300, check=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parts_this_run"] == 2 and [p["part"] for p in summary["parts"]] == [0, 1, 2]
    assert (out / "_done" / "part_0.json").stat().st_mtime_ns == stamp
    full = tmp_path / "full"
    run_embed(str(d), full, load_config(None, tiny))
    for k in range(3):
        assert pq.read_table(out / "metadata" / f"metadata_{k}.parquet").equals(
            pq.read_table(full / "metadata" / f"metadata_{k}.parquet")
        )
        np.testing.assert_allclose(np.load(out / "img_emb" / f"img_emb_{k}.npy"),
                                   np.load(full / "img_emb" / f"img_emb_{k}.npy"), atol=1e-3)  # fmt: skip


@pytest.mark.parametrize("where", ["actor init", "task"])
def test_bad_input_met_on_a_worker_is_one_runerror(ray_local, where):
    from rdistill.ray.pools import drain

    class RefusesToLoad:  # defined here so that Ray pickles it by value (workers cannot import test modules)
        """An actor whose model cannot be loaded: bad input met on a worker, not in the driver."""

        def __init__(self):
            from rdistill.models.unclip import DecoderError

            raise DecoderError("synthesize.model: cannot load StableUnCLIPImg2ImgPipeline 'org/missing': offline")

        def __call__(self, batch):
            return batch

    def fails_in_task(batch):
        from rdistill.io.store import StoreError

        raise StoreError("s3://bucket/img_emb/img_emb_7.npy: truncated")

    ds = ray_local.data.from_items([{"x": 1}, {"x": 2}])
    if where == "actor init":
        ds = ds.map_batches(RefusesToLoad, compute=ray_local.data.ActorPoolStrategy(size=1), num_cpus=0.5)
        message = "synthesize.model: cannot load StableUnCLIPImg2ImgPipeline 'org/missing': offline"
    else:
        ds = ds.map_batches(fails_in_task)
        message = "s3://bucket/img_emb/img_emb_7.npy: truncated"
    with pytest.raises(RunError) as info:
        drain(ds, lambda batch: None, "test")
    assert str(info.value) == f"test stage failed: {message}"


def test_a_bug_on_a_worker_keeps_its_traceback(ray_local):
    from rdistill.ray.pools import drain

    ds = ray_local.data.from_items([{"x": 1}]).map_batches(lambda b: {}["missing"])
    with pytest.raises(Exception) as info:
        drain(ds, lambda batch: None, "test")
    assert not isinstance(info.value, RunError) and "KeyError" in repr(info.value) + str(info.value)


def test_decoder_directory_that_is_no_pipeline_is_refused_before_any_actor(planted_store, tmp_path):
    root, _ = planted_store
    run_prototypes(str(root), tmp_path / "p", cfg())
    (tmp_path / "notapipe").mkdir()
    for model, message in [(tmp_path / "nowhere", "no such directory"), (tmp_path / "notapipe", "no model_index")]:
        with pytest.raises(InputError, match=message):
            run_synthesize(tmp_path / "p", tmp_path / "d", load_config(None, [f"synthesize.model={model}"]))
