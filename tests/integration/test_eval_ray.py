"""The harness on Ray Train: every run a TorchTrainer, two data-parallel workers computing what one process does
at the same global batch. (How much runs gain from training side by side is measured in docs/benchmarks.md.)"""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rdistill.config import load_config  # noqa: E402
from rdistill.eval.driver import run_evaluate  # noqa: E402
from rdistill.eval.toy import write_toy_karpathy  # noqa: E402
from rdistill.io.distilled import write_distilled_set  # noqa: E402
from rdistill.io.karpathy import read_karpathy  # noqa: E402

pytestmark = pytest.mark.slow  # Ray Train runs: about 20 s each to start on 2 cores

SIZE = 32
TINY = [
    "evaluate.students=rdistill-tiny-vit",
    "evaluate.image_weights=random",
    "evaluate.text_encoder=clip:rdistill-tiny",
    f"evaluate.image_size={SIZE}",
    "evaluate.epochs=2",
    "evaluate.eval_every=1",
    "evaluate.batch_size=32",
    "evaluate.lr_image=0.1",
    "evaluate.lr_text=0.1",
    "evaluate.runs=2",
    "evaluate.random_subset=false",
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-ray")
    kj = write_toy_karpathy(root / "karpathy", {"train": 40, "val": 16, "test": 16}, seed=2, size=SIZE)
    split = read_karpathy(kj).splits["train"]
    samples = [
        {
            "key": f"{i:08d}",
            "image": open(split.paths[i], "rb").read(),
            "ext": "png",
            "caption": split.captions[split.img2txt[i][0]],
            "meta": {"source_index": i},
        }
        for i in range(32)
    ]
    write_distilled_set(root / "subset", samples, shard_size=10, method="real-subset", text_space="none")
    return kj, root / "subset"


def test_table_on_ray_train_with_two_data_parallel_workers_gives_the_local_numbers(ray_local, toy, tmp_path):
    """One table of 2 runs through Ray Train, each run a TorchTrainer of 2 data-parallel workers (each embeds half
    of every global batch and sees the other half's features as negatives), against the same table run locally
    in one process: the same losses at every pass and the same recalls."""
    kj, subset = toy
    local = run_evaluate(
        [str(subset)], str(kj), tmp_path / "local", load_config(None, TINY + ["evaluate.executor=local"])
    )
    remote = run_evaluate(
        [str(subset)],
        str(kj),
        tmp_path / "ray",
        load_config(None, TINY + ["evaluate.executor=ray", "evaluate.workers=2"]),
    )
    assert remote["executor"] == "ray" and local["executor"] == "local"
    (a,), (b,) = local["results"], remote["results"]
    assert a["runs"] == b["runs"] == 2 and b["workers"] == 2 and a["workers"] == 1
    assert a["epochs"] == b["epochs"]
    for k in a["test"]:
        assert a["test"][k] == pytest.approx(b["test"][k], abs=1e-6), k
    recs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "ray" / "runs").glob("*.json")}
    locs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "local" / "runs").glob("*.json")}
    assert sorted(recs) == sorted(locs) and len(recs) == 2
    for name, rec in recs.items():
        assert rec["workers"] == 2 and locs[name]["workers"] == 1
        assert rec["losses"] == pytest.approx(locs[name]["losses"], rel=1e-5)
        assert len(set(rec["losses"])) == len(rec["losses"])  # the loss moved: the updates agree, not just step 1
    assert len({r["seed"] for r in recs.values()}) == 2
