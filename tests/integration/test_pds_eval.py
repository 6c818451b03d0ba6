"""The whole path: rdistill.pds --eval-data on the demo config puts the recall table into the job's report."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rdistill.eval.toy import write_toy_karpathy  # noqa: E402
from rdistill.stages.pds import main  # noqa: E402

pytestmark = pytest.mark.slow  # the whole demo job

SMALL = ["job.toy_shards=2", "job.toy_per_shard=40", "cluster.num_pairs=8", "synthesize.shard_size=4",
         "synthesize.batch_size=4", "synthesize.image_size=32", "evaluate.epochs=2", "evaluate.eval_every=1",
         "evaluate.students=rdistill-tiny-vit", "evaluate.lr_image=0.05", "evaluate.lr_text=0.05"]  # fmt: skip


def test_pds_eval_data_adds_the_table_to_the_report(ray_local, tmp_path, capsys):
    kj = write_toy_karpathy(tmp_path / "karpathy", {"train": 30, "val": 10, "test": 10}, seed=7, size=32)
    out = tmp_path / "job"
    args = ["--config", "configs/demo.yaml", "--output", str(out), "--eval-data", str(kj), "--quiet"]
    assert main(args + [x for s in SMALL for x in ("--set", s)]) == 0
    assert "evaluate" in capsys.readouterr().out
    doc = json.loads((out / "eval" / "eval.json").read_text())
    rows = {r["set"]: r for r in doc["results"]}
    assert set(rows) == {"distilled", "random-subset-8"}
    # the PDS set trains on its text prototypes, found to be in the demo CLIP's space from the run records
    assert rows["distilled"]["text_side"] == "npy" and rows["distilled"]["pairs"] == 8
    assert rows["distilled"]["runs"] == 2 and len(rows["distilled"]["curve"]) == 3
    report = (out / "report.html").read_text()
    assert "Retrieval evaluation" in report and "random-subset-8" in report and "rdistill-tiny-vit" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["evaluate"]["status"] == "ran"
    assert summary["evaluate"]["results"][0]["test"] == doc["results"][0]["test"]
