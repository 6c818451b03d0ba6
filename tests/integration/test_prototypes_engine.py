"""The prototype engine end to end on planted stores written by the tests (no Ray needed for this stage)."""

import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from rdistill.config import load_config
from rdistill.dev.planted import score_recovery
from rdistill.engine.driver import main, run_prototypes
from rdistill.errors import RunError
from rdistill.io.store import StoreError
from tests.conftest import read_vectors


def cfg(**over):
    return load_config(None, ["progress=false", *[f"{k}={v}" for k, v in over.items()]])


def test_recovers_planted_concepts(planted_store, tmp_path):
    root, concepts = planted_store
    summary = run_prototypes(str(root), tmp_path / "out", cfg(**{"cluster.num_pairs": 20}))
    t = pq.read_table(tmp_path / "out" / "prototypes.parquet")
    assert t.num_rows == 20
    img, txt = read_vectors(t, "image_embedding"), read_vectors(t, "text_embedding")
    score = score_recovery(img, txt, concepts)
    assert score["recovered"] == 1.0 and score["mispaired"] == 0
    assert score["img_cosine"] > 0.99 and score["txt_cosine"] > 0.99
    # sorted by alignment, ids in order, shared pairs only (no pairless at this size)
    align = t["alignment"].to_numpy()
    assert np.all(np.diff(align) <= 0)
    assert t["id"].to_pylist() == list(range(20))
    assert summary["counts"]["pruned"] == int(0.2 * 12_000)
    assert summary["match"]["lap_objective"] == t["shared_pairs"].to_numpy().sum()
    # the retrieved caption belongs to the concept the text prototype stands for
    caption_concepts = [int(c.split("concept ")[1].split(")")[0]) for c in t["caption"].to_pylist()]
    txt_concept = (txt / np.linalg.norm(txt, axis=1, keepdims=True) @ concepts.txt_means.T).argmax(1)
    assert caption_concepts == txt_concept.tolist()
    assert all(k for k in t["caption_key"].to_pylist())
    # resolved config and summary beside the output
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["cluster"]["num_pairs"] == 20
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["prototypes"]["count"] == 20
    assert (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "out" / "_work").exists()


def test_result_does_not_depend_on_block_size_or_cache(planted_store, tmp_path):
    root, _ = planted_store
    streamed = {"cluster.num_pairs": 20, "embeddings.block_rows": 1024, "embeddings.cache_gb": 0}
    a = run_prototypes(str(root), tmp_path / "a", cfg(**streamed))
    b = run_prototypes(str(root), tmp_path / "b", cfg(**{"cluster.num_pairs": 20}))
    ta, tb = pq.read_table(tmp_path / "a" / "prototypes.parquet"), pq.read_table(tmp_path / "b" / "prototypes.parquet")
    assert a["counts"] == b["counts"]
    np.testing.assert_allclose(read_vectors(ta, "image_embedding"), read_vectors(tb, "image_embedding"), atol=1e-5)
    assert ta["caption_row"].to_pylist() == tb["caption_row"].to_pylist()


@pytest.mark.parametrize("policy", ["keep", "drop", "refill"])
def test_pairless_policies_with_many_clusters(planted_store, tmp_path, policy):
    root, _ = planted_store
    m = 300  # far more clusters than planted concepts: many matches end up pairless
    run_prototypes(str(root), tmp_path / policy, cfg(**{"cluster.num_pairs": m, "prototypes.pairless": policy}))
    t = pq.read_table(tmp_path / policy / "prototypes.parquet")
    shared = t["shared_pairs"].to_numpy()
    cells = set(zip(t["image_cluster"].to_pylist(), t["text_cluster"].to_pylist()))
    assert len(cells) == t.num_rows
    if policy == "keep":
        assert t.num_rows == m and t["pairless"].to_numpy().sum() == (shared == 0).sum() > 0
    elif policy == "drop":
        assert t.num_rows < m and (shared > 0).all()
    else:
        assert t.num_rows == m and (shared > 0).all() and t["refilled"].to_numpy().sum() > 0


def test_sparse_solver_path(planted_store, tmp_path):
    root, _ = planted_store
    dense = run_prototypes(str(root), tmp_path / "d", cfg(**{"cluster.num_pairs": 50}))
    sparse = run_prototypes(str(root), tmp_path / "s", cfg(**{"cluster.num_pairs": 50, "match.dense_max": 10}))
    assert sparse["match"]["solver"] == "scipy-sparse-lapjv" and dense["match"]["solver"] == "lapjv-dense"
    assert sparse["match"]["lap_objective"] == dense["match"]["lap_objective"]


def test_reads_fsspec_urls(planted_store, tmp_path):
    root, _ = planted_store
    fs = fsspec.filesystem("memory")
    for path in root.rglob("*"):
        if path.is_file():
            fs.pipe(f"/planted/{path.relative_to(root)}", path.read_bytes())
    summary = run_prototypes("memory://planted", tmp_path / "out", cfg(**{"cluster.num_pairs": 20}))
    local = run_prototypes(str(root), tmp_path / "local", cfg(**{"cluster.num_pairs": 20}))
    assert summary["counts"] == local["counts"]
    assert summary["match"] == local["match"]


def test_invalid_rows_are_skipped_and_counted(store_copy, tmp_path):
    root, _ = store_copy
    path = root / "img_emb" / "img_emb_1.npy"
    x = np.load(path)
    x[5] = np.nan
    x[7] = 0
    np.save(path, x)
    t = np.load(root / "text_emb" / "text_emb_2.npy")
    t[0, 3] = np.inf
    np.save(root / "text_emb" / "text_emb_2.npy", t)
    summary = run_prototypes(str(root), tmp_path / "out", cfg(**{"cluster.num_pairs": 20}))
    assert summary["counts"]["invalid"] == 3
    assert summary["counts"]["invalid_per_part"] == {str(path): 2, str(root / "img_emb" / "img_emb_2.npy"): 1}
    assert summary["counts"]["pruned"] == int(0.2 * (12_000 - 3))
    with pytest.raises(StoreError, match=r"img_emb_1.npy.*row 5"):
        run_prototypes(str(root), tmp_path / "err", cfg(**{"cluster.num_pairs": 20, "embeddings.on_invalid": "error"}))


def test_store_errors_name_the_file(store_copy, tmp_path):
    root, _ = store_copy
    (root / "text_emb" / "text_emb_2.npy").unlink()
    with pytest.raises(StoreError, match=r"text_emb_2.npy: missing"):
        run_prototypes(str(root), tmp_path / "o", cfg())
    np.save(root / "text_emb" / "text_emb_2.npy", np.zeros((10, 64), dtype=np.float16))
    with pytest.raises(StoreError, match=r"text_emb_2.npy: 10 rows but .*img_emb_2.npy has 4000"):
        run_prototypes(str(root), tmp_path / "o", cfg())
    np.save(root / "text_emb" / "text_emb_2.npy", np.zeros((4000, 32), dtype=np.float16))
    with pytest.raises(StoreError, match=r"text_emb_2.npy: dimension 32"):
        run_prototypes(str(root), tmp_path / "o", cfg())
    np.save(root / "text_emb" / "text_emb_2.npy", np.zeros((4000, 64), dtype=np.int8))
    with pytest.raises(StoreError, match=r"text_emb_2.npy: dtype int8 not supported"):
        run_prototypes(str(root), tmp_path / "o", cfg())
    with pytest.raises(StoreError, match="no column 'caption_text'"):
        run_prototypes(str(root), tmp_path / "o", cfg(**{"embeddings.caption_column": "caption_text"}))
    with pytest.raises(StoreError, match="not found"):
        run_prototypes(str(tmp_path / "nowhere"), tmp_path / "o", cfg())


def test_truncated_part_is_named(store_copy, tmp_path):
    root, _ = store_copy
    path = root / "img_emb" / "img_emb_0.npy"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(StoreError, match=r"img_emb_0.npy: truncated"):
        run_prototypes(str(root), tmp_path / "o", cfg())


def test_too_many_pairs_requested(planted_store, tmp_path):
    root, _ = planted_store
    with pytest.raises(RunError, match=r"cluster.num_pairs=9601 is larger than the 9600 pairs kept"):
        run_prototypes(str(root), tmp_path / "o", cfg(**{"cluster.num_pairs": 9601}))


def test_cli_rerun_skips_and_refuses_other_config(planted_store, tmp_path, capsys):
    root, _ = planted_store
    args = ["--embeddings", str(root), "--output", str(tmp_path / "out"), "--num-pairs", "20", "--quiet"]
    assert main(args) == 0
    assert "prototypes: 20 written" in capsys.readouterr().out
    mtime = (tmp_path / "out" / "prototypes.parquet").stat().st_mtime_ns
    assert main(args) == 0
    assert (tmp_path / "out" / "prototypes.parquet").stat().st_mtime_ns == mtime
    assert main([*args, "--set", "prune.ratio=0.3"]) == 2
    err = capsys.readouterr().err
    assert "changed since: config prune.ratio: 0.2 -> 0.3; pass --overwrite" in err and "Traceback" not in err
    assert main([*args, "--set", "prune.ratio=0.3", "--overwrite"]) == 0


def test_cli_reports_bad_config_without_traceback(planted_store, tmp_path, capsys):
    root, _ = planted_store
    rc = main(["--embeddings", str(root), "--output", str(tmp_path / "o"), "--set", "cluster.num_pair=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown config key cluster.num_pair" in err and "Traceback" not in err


def test_killed_run_without_checkpoints_is_redone_from_scratch(planted_store, tmp_path):
    root, _ = planted_store
    out = tmp_path / "out"
    first = run_prototypes(str(root), out, cfg(**{"cluster.num_pairs": 20}))
    expected = pq.read_table(out / "prototypes.parquet")
    # a run killed mid-way leaves spills and maybe an old table, but never the _SUCCESS marker
    (out / "_SUCCESS").unlink()
    (out / "_work").mkdir()
    (out / "_work" / "sims_0.npy").write_bytes(b"partial")
    (out / "prototypes.parquet").write_bytes(b"stale")
    again = run_prototypes(str(root), out, cfg(**{"cluster.num_pairs": 20}))
    assert again["counts"] == first["counts"]
    assert pq.read_table(out / "prototypes.parquet").equals(expected)
    assert (out / "_SUCCESS").exists() and not (out / "_work").exists()


def test_driver_killed_after_kmeans_resumes_from_there(planted_store, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root, _ = planted_store
    full = run_prototypes(str(root), tmp_path / "full", cfg(**{"cluster.num_pairs": 20}))
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[2]
    cli = [sys.executable, "-m", "rdistill.prototypes", "--embeddings", str(root), "--output", str(out),
           "--num-pairs", "20", "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo), "RDISTILL_FAULT_KILL_AFTER": "prototypes.cluster:1"}
    env.pop("RAY_ADDRESS", None)
    killed = subprocess.run(cli, env=env, cwd=repo, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "_work").glob("*.pkl")) == ["cluster.pkl", "prune.pkl", "scan.pkl"]
    assert not (out / "_SUCCESS").exists()
    # the finished passes are work to protect: another config is refused, not silently recomputed over them
    with pytest.raises(RunError, match="prune.ratio: 0.2 -> 0.3"):
        run_prototypes(str(root), out, cfg(**{"cluster.num_pairs": 20, "prune.ratio": 0.3}))
    again = run_prototypes(str(root), out, cfg(**{"cluster.num_pairs": 20}))
    assert again["resumed_steps"] == ["scan", "prune", "cluster"]
    assert all(again["steps"][s]["seconds"] > 0 for s in ("assign", "prototypes", "captions"))
    assert again["counts"] == full["counts"] and again["kmeans"] == full["kmeans"]
    assert pq.read_table(out / "prototypes.parquet").equals(pq.read_table(tmp_path / "full" / "prototypes.parquet"))
    assert not (out / "_work").exists()


def test_driver_killed_mid_pass_resumes_after_the_parts_it_had_reduced(planted_store, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root, _ = planted_store  # 3 parts
    full = run_prototypes(str(root), tmp_path / "full", cfg(**{"cluster.num_pairs": 20}))
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[2]
    cli = [sys.executable, "-m", "rdistill.prototypes", "--embeddings", str(root), "--output", str(out),
           "--num-pairs", "20", "--quiet", "--set", "checkpoint_seconds=0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo), "RDISTILL_FAULT_KILL_AFTER": "prototypes.prototypes.part:1"}
    env.pop("RAY_ADDRESS", None)
    killed = subprocess.run(cli, env=env, cwd=repo, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert (out / "_work" / "prototypes.partial.pkl").exists() and not (out / "_work" / "prototypes.pkl").exists()
    again = run_prototypes(str(root), out, cfg(**{"cluster.num_pairs": 20, "checkpoint_seconds": 0}))
    assert again["resumed_steps"] == ["scan", "prune", "cluster", "assign", "match"]
    assert again["steps"]["prototypes"]["resumed_parts"] == 1  # only the last two parts were read again
    assert again["steps"]["prototypes"]["bytes_read"] * 3 == full["steps"]["prototypes"]["bytes_read"] * 2
    assert pq.read_table(out / "prototypes.parquet").equals(pq.read_table(tmp_path / "full" / "prototypes.parquet"))


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_cluster_gpu_without_a_gpu_stops_the_run_before_any_work(planted_store, tmp_path, executor, request):
    from rdistill.errors import ConfigError

    if executor == "ray":
        request.getfixturevalue("ray_local")  # a CPU-only instance
    root, _ = planted_store
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="cluster.gpu is true but") as e:
        run_prototypes(str(root), out, cfg(**{"cluster.num_pairs": 20, "cluster.gpu": True, "executor": executor}))
    assert ("no GPUs" if executor == "ray" else "faiss") in str(e.value)
    assert not list((out / "_work").glob("*.npy"))  # nothing was scanned
    if executor == "local":  # the corrected rerun is not blocked by the failed one
        assert run_prototypes(str(root), out, cfg(**{"cluster.num_pairs": 20}))["prototypes"]["count"] == 20
