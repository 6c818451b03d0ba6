"""The evaluation harness: train student CLIPs on distilled sets and report the papers' recall table.

    python -m rdistill.evaluate --train DISTILLED [DISTILLED ...] --eval-data SPEC [--eval-images DIR]
                                --output DIR [--protocol pds|lors] [--select val|test] [--config FILE] [--set k=v]

``DISTILLED`` is any set in rdistill's distilled format (PDS output, a coreset, a real subset); ``SPEC`` a
Karpathy-style ``.json`` (images under ``--eval-images``) or WebDataset shards with several captions per sample
(:mod:`rdistill.io.karpathy`), or ``toy`` (a small toy set written into the output, for the offline demo). The
table has one row per set, plus a random subset of the same size and, on request, the full training split when
the eval data has a train split; one column group per student; each cell the mean and std over
``evaluate.runs`` runs of the test recalls at the pass selected on the val split (``--select test``: on the test
split, as the reference code does, which the outputs say wherever they show it).

    DIR/eval.json      results: one entry per (set, student, protocol): set, student, protocol, select, runs,
                       test / test_std (IR@1/5/10, TR@1/5/10, r_mean, percent), epochs, curve; and the settings
    DIR/eval.html      the table side by side and the recall-vs-pass curves
    DIR/runs/*.json    one record per run, with its val and test curves: a rerun reuses the finished runs, also
                       with another --select, more runs or other sets (NOT_CLAIMED); DIR/cache/ eval images and text
                       features, decoded and encoded once per image size and text encoder; DIR/evaluate.json the
                       run record

A set's learned learning rates (``distilled.json`` ``students``) become the students' lrs, its learned soft labels
(LoRS) switch their loss to LoRS's weighted BCE (:func:`rdistill.eval.train.soft_label_loss`), and its optimised
float images (``image.tensor``) are trained on as they are, without 8-bit rounding.

Text features of the eval captions are computed once per encoder (frozen, as both protocols keep it). Under the
PDS protocol every text feature the head sees is by default an L2-normalised CLIP embedding (a PDS set's ``.npy``
vectors are means of unit vectors, used as they are); the authors feed raw CLIP features and means of raw features.
The directions are the same, but the head (Linear with bias, GELU, ...) is not scale-invariant, so its outputs, the
training and the recalls differ, and numbers may differ from the published ones because of it.
``evaluate.text_norm=raw`` feeds raw caption features (and raw eval-caption features with them) to caption-based
sets, as the authors do; a set's ``.npy`` vectors are used as the set stores them. Under the LoRS protocol BERT CLS
features are used raw, as LoRS does.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from rdistill.cli import add_common_args, run_cli
from rdistill.config import Config, _result_fields
from rdistill.errors import RunError
from rdistill.eval.sets import TrainSet, pairs_from_split, read_distilled_set
from rdistill.eval.table import summarize_runs
from rdistill.eval.train import RunJob, TrainSettings
from rdistill.io.distilled import read_distilled_info
from rdistill.io.fingerprint import fingerprint_urls
from rdistill.io.karpathy import EvalData, load_eval_data, load_images
from rdistill.io.outputs import (
    SUCCESS,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    claim_output,
    clear_output,
    describe_changes,
    lock_output,
)
from rdistill.models.students import PROTOCOLS, StudentSpec, TextEncoder, blip_caption, parse_text_encoder

log = logging.getLogger(__name__)

RUN_FILE = "evaluate.json"
SELECT_TEST_NOTE = (
    "epochs selected on the TEST split (--select test, the reference code's choice): optimistic, "
    "for parity with published numbers only"
)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """An evaluation protocol resolved against the config."""

    name: str
    students: tuple[str, ...]
    features: str
    text_encoder: str
    lr: float
    text_unit: bool


def resolve_protocol(cfg: Config) -> Protocol:
    ev = cfg.evaluate
    p = PROTOCOLS[ev.protocol]
    students = tuple(s.strip() for s in ev.students.split(",") if s.strip()) or p["students"]
    return Protocol(
        ev.protocol,
        students,
        p["features"] if ev.image_features == "auto" else ev.image_features,
        ev.text_encoder or p["text_encoder"],
        p["lr"],
        p["text_unit"],
    )


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _save_npy(path: Path, x: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, x)


class FeatureCache:
    """Eval images decoded once per size and text features encoded once per encoder, kept in ``root``."""

    def __init__(self, root: Path, cfg: Config, protocol: Protocol):
        self.root, self.cfg, self.protocol = root, cfg, protocol
        self._encoder: TextEncoder | None = None
        self.seconds = {"images": 0.0, "text": 0.0, "text_cpu": 0.0}

    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            import torch

            device = "cuda" if self.cfg.evaluate.device != "cpu" and torch.cuda.is_available() else "cpu"
            self._encoder = TextEncoder(parse_text_encoder(self.protocol.text_encoder), device)
        return self._encoder

    def _prep(self, captions: list[str]) -> list[str]:
        ev = self.cfg.evaluate
        return [blip_caption(c, ev.max_words) for c in captions] if ev.caption_preprocess == "blip" else captions

    def text(self, captions: list[str]) -> np.ndarray:
        """Raw ``(n, d) float32`` features of ``captions`` under the protocol's text encoder."""
        ev = self.cfg.evaluate
        prepped = self._prep(captions)
        key = _digest(self.protocol.text_encoder, ev.caption_preprocess, ev.max_words, prepped)
        path = self.root / "text" / f"{key}.npy"
        if path.exists():
            return np.load(path)
        t0, c0 = time.perf_counter(), time.process_time()
        feats = self.encoder().encode(prepped).astype(np.float32)
        self.seconds["text"] += time.perf_counter() - t0
        self.seconds["text_cpu"] += time.process_time() - c0
        _save_npy(path, feats)
        return feats

    def images(self, split) -> np.ndarray:
        size = self.cfg.evaluate.image_size
        key = _digest(split.source, split.name, size, split.names)
        path = self.root / "images" / f"{split.name}-{size}-{key}.npy"
        if path.exists():
            return np.load(path)
        t0 = time.perf_counter()
        arr = load_images(split, size)
        self.seconds["images"] += time.perf_counter() - t0
        _save_npy(path, arr)
        return arr


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _text_side(ts: TrainSet, cache: FeatureCache, cfg: Config, protocol: Protocol) -> tuple[np.ndarray, bool, str]:
    """The set's training text features, whether the run works on unit features (the eval captions' features are
    then normalised too), and which side was used (``npy`` or ``caption``)."""
    mode = cfg.evaluate.train_text
    text = ts.info.get("text") or {}
    if ts.vectors is not None and mode in ("auto", "npy"):
        space = text.get("space", "unknown")
        dim = cache.encoder().dim
        if space not in (protocol.text_encoder, "unknown"):
            raise RunError(
                f"{ts.path}: its text vectors live in {space} but the {protocol.name} protocol encodes "
                f"text with {protocol.text_encoder} (evaluate.text_encoder); evaluate with that encoder, "
                "or --set evaluate.train_text=caption to encode the set's captions instead"
            )
        if ts.vectors.shape[1] != dim:
            raise RunError(
                f"{ts.path}: text vectors are {ts.vectors.shape[1]}-d but {protocol.text_encoder} gives "
                f"{dim}-d features"
            )
        if space == "unknown":
            log.warning(
                "%s: text space unknown (no distilled.json, no run records); taken as %s since the dimensions agree",
                ts.path,
                protocol.text_encoder,
            )
        return ts.vectors.astype(np.float32), bool(text.get("normalized", True)), "npy"
    if mode == "npy":
        raise RunError(f"{ts.path}: evaluate.train_text is npy but the set has no .npy text vectors")
    if any(not c for c in ts.captions):
        raise RunError(f"{ts.path}: some samples have no caption (txt member) to encode")
    feats = cache.text(ts.captions)
    norm = cfg.evaluate.text_norm
    # unit features are not the authors' raw ones for the head, which is not scale-invariant (module docstring)
    unit = protocol.text_unit if norm == "auto" else norm == "unit"
    return (_unit(feats) if unit else feats), unit, "caption"


def _settings(cfg: Config, protocol: Protocol, ts: TrainSet) -> TrainSettings:
    ev = cfg.evaluate
    learned = ts.info.get("students") or {}
    soft = ""
    if learned.get("soft_labels"):
        soft = str(learned.get("soft_label_loss") or "wbce")
        if soft not in ("wbce", "bce", "infonce"):
            raise RunError(f"{ts.path}: distilled.json students.soft_label_loss {soft!r} is not wbce, bce or infonce")
    lr_image = ev.lr_image or learned.get("lr_image") or protocol.lr
    lr_text = ev.lr_text or learned.get("lr_text") or protocol.lr
    return TrainSettings(
        epochs=ev.epochs,
        eval_every=ev.eval_every,
        batch_size=ev.batch_size,
        lr_image=float(lr_image),
        lr_text=float(lr_text),
        momentum=ev.momentum,
        weight_decay=ev.weight_decay,
        decay_epoch=ev.decay_epoch or ev.epochs // 2 + 1,
        decay_factor=ev.decay_factor,
        temperature=ev.temperature,
        head_dropout=ev.head_dropout,
        image_trainable=ev.image_trainable,
        eval_batch_size=ev.eval_batch_size,
        soft_labels=soft,
    )


def run_seed(seed: int, student: str, run: int) -> int:
    """The seed of run ``run`` of ``student``: the same for every set, so sets are compared on the same inits."""
    h = int.from_bytes(hashlib.blake2b(student.encode(), digest_size=4).digest(), "little")
    return int(np.random.SeedSequence([seed, h, run]).generate_state(1)[0] % (2**31 - 1))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-")[:60]


def _set_id(name: str, path: str, kind: str) -> str:
    """The part of a run id naming its set: stable when the set list changes (a distilled set's display name may
    become ``PARENT/NAME`` when another set of the same name is added) and whatever path spelling names the set."""
    where = str(Path(path).resolve()) if kind == "distilled" else path
    return f"{_slug(Path(name).name)}-{_digest(where, kind)[:6]}"


def _set_names(paths: list[str]) -> list[str]:
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(p).resolve().parent.name}/{Path(p).resolve().name}" for p in paths]


def _device(cfg: Config, executor: str) -> str:
    want = cfg.evaluate.device
    if want != "auto":
        return want
    if executor == "ray":
        import ray

        return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _workers(cfg: Config, ts: TrainSet, device: str, executor: str) -> int:
    ev = cfg.evaluate
    if executor == "local" or not ev.image_trainable:
        return 1  # a frozen backbone trains the head only: nothing to spread
    if ev.workers:
        return ev.workers
    if ts.num_pairs <= ev.data_parallel_pairs:
        return 1
    if device == "cuda":
        import ray

        return max(1, int(ray.cluster_resources().get("GPU", 0) // max(ev.gpus_per_worker, 1e-3)))
    return 1


def _executor(cfg: Config) -> str:
    ev = cfg.evaluate
    if ev.executor != "auto":
        return ev.executor
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    return "ray" if address and address != "local" else "local"


def _fingerprint_set(path: str) -> dict:
    root = Path(path)
    files = [str(root / "manifest.parquet")] + sorted(str(p) for p in (root / "shards").glob("*.tar"))
    if (root / "distilled.json").exists():
        files.append(str(root / "distilled.json"))
        soft = ((read_distilled_info(root).get("students") or {}).get("soft_labels")) or ""
        if soft and (root / Path(soft).name).exists():
            files.append(str(root / Path(soft).name))
    return {Path(f).relative_to(root).as_posix(): v for f, v in fingerprint_urls(files).items()}


def _fingerprint_eval(data: EvalData) -> dict:
    if data.kind == "karpathy":
        return fingerprint_urls([data.source])
    return {"splits": {k: {"images": v.num_images, "captions": _digest(v.captions)} for k, v in data.splits.items()}}


def _clear(out: Path) -> None:
    clear_output(out, ("runs", "_work"), (SUCCESS, "eval.json", "eval.html", RUN_FILE, "config.yaml"))


def run_evaluate(
    train: list[str],
    eval_data: str,
    output: str | Path,
    cfg: Config,
    *,
    eval_images: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Evaluate the distilled sets ``train`` on ``eval_data`` into ``output``; returns the ``eval.json`` content."""
    out = Path(output)
    with lock_output(out):
        return _run_evaluate(train, eval_data, out, cfg, eval_images, overwrite)


def _eval_source(eval_data: str, eval_images: str | None, out: Path, cfg: Config) -> EvalData:
    if eval_data == "toy":
        from rdistill.eval.toy import write_toy_karpathy

        path = out / "toy-eval" / "dataset_toy.json"
        if not path.exists():
            write_toy_karpathy(path.parent, {"train": 200, "val": 40, "test": 40}, seed=cfg.seed + 1)
        return load_eval_data(str(path))
    return load_eval_data(eval_data, eval_images)


# Settings a rerun may change and still resume from the finished runs: epoch selection reads the runs' curves
# (each run's record holds its val and test numbers), more runs or sets only add runs and fewer leave some unused,
# and the random-subset and full-data rows are sets like the others. What a run computes (its set, student,
# settings and seed) is checked run by run against its record (runner.load_done); the rest of the config is claimed.
NOT_CLAIMED = ("select", "runs", "random_subset", "full_data")


def _claimed_config(cfg: Config) -> dict:
    ev = {k: v for k, v in _result_fields(cfg.evaluate).items() if k not in NOT_CLAIMED}
    return {"seed": cfg.seed, "evaluate": ev}


def _read_record(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _claim(out: Path, train: list[str], eval_data: str, data: EvalData, cfg: Config, overwrite: bool) -> None:
    """Make ``out`` the output of this evaluation and write its run record. The eval data and the claimed config
    must agree with the previous record's (:func:`claim_output`'s rule); sets may be added or left out, but a set
    evaluated before must have the same content (its shards, manifest and ``distilled.json``), else the evaluation
    is refused naming what changed, unless ``overwrite``."""
    path = out / RUN_FILE
    previous = _read_record(path)
    if previous is not None and "sets" not in previous and "sets" in (previous.get("input") or {}):
        # a record of the first harness (fcedb1e): its sets were claimed with the eval data and every setting,
        # and it had no text_norm (it fed text features as ``auto`` does)
        previous["sets"] = previous["input"].pop("sets")
        claimed = (previous.get("config") or {}).get("evaluate")
        if isinstance(claimed, dict):
            for k in NOT_CLAIMED:
                claimed.pop(k, None)
            claimed.setdefault("text_norm", "auto")
        atomic_write_json(path, previous)
    sets = {str(Path(p).resolve()): _fingerprint_set(p) for p in train}
    record = {
        "train": list(sets),
        "eval_data": str(eval_data),
        "input": {"eval": _fingerprint_eval(data)},
        "config": _claimed_config(cfg),
        "unclaimed": {k: getattr(cfg.evaluate, k) for k in NOT_CLAIMED},
    }
    cleared = []

    def clear(o: Path) -> None:
        _clear(o)
        cleared.append(o)

    holds = "an evaluation on other eval data or settings"
    claim_output(out, RUN_FILE, record, ("input", "config"), overwrite, clear, holds)
    known = {} if cleared or previous is None else dict(previous.get("sets") or {})
    stale = [p for p in sets if p in known and known[p] != sets[p]]
    if stale:
        changed = describe_changes(
            {"set": {p: known[p] for p in stale}}, {"set": {p: sets[p] for p in stale}}, ("set",)
        )
        runs = [f for p in stale for f in (out / "runs").glob(f"{_set_id(Path(p).name, p, 'distilled')}__*.json")]
        if runs and not overwrite:
            raise RunError(
                f"{out} holds runs on sets that changed since: {changed}; pass --overwrite to redo those sets' "
                "runs, or choose another --output"
            )
        log.warning("%s: redoing the runs of %d changed sets, since %s", out, len(stale), changed)
        for f in runs:
            f.unlink()
    # every set evaluated into ``out`` so far, so that leaving one out and adding it back later is checked too
    record["sets"] = {**known, **sets}
    (out / SUCCESS).unlink(missing_ok=True)
    atomic_write_json(path, record)
    atomic_write_text(
        out / "config.yaml",
        yaml.safe_dump({"seed": cfg.seed, "evaluate": _result_fields(cfg.evaluate)}, sort_keys=False),
    )


def _run_evaluate(train, eval_data, out: Path, cfg: Config, eval_images, overwrite) -> dict:
    t_start = time.perf_counter()
    ev = cfg.evaluate
    if not train:
        raise RunError("nothing to evaluate: give --train DISTILLED [DISTILLED ...]")
    protocol = resolve_protocol(cfg)
    data = _eval_source(eval_data, eval_images, out, cfg)
    test = data.require("test", "the table reports test recall")
    val = (
        data.require("val", "epochs are selected on it; --select test selects on the test split")
        if (ev.select == "val")
        else data.splits.get("val")
    )
    _claim(out, train, eval_data, data, cfg, overwrite)
    cache = FeatureCache(out / "cache", cfg, protocol)
    # the students are built once here, so that a model or weights that cannot be had fail before any run starts
    for name in protocol.students:
        from rdistill.models.students import build_image_model

        build_image_model(StudentSpec(name, ev.image_weights, protocol.features, ev.image_size))
    t0 = time.perf_counter()
    sets: list[TrainSet] = []
    for path, name in zip(train, _set_names(train)):
        sets.append(read_distilled_set(path, ev.image_size, name))
    if "train" in data.splits:
        sizes = sorted({s.num_pairs for s in sets})
        if ev.random_subset:
            for m in sizes:
                sets.append(
                    pairs_from_split(
                        data.splits["train"],
                        ev.image_size,
                        f"random-subset-{m}",
                        "random-subset",
                        pairs=m,
                        seed=cfg.seed,
                    )
                )
        if ev.full_data:
            sets.append(pairs_from_split(data.splits["train"], ev.image_size, "full-data", "full-data"))
    t_sets = time.perf_counter() - t0
    raw_eval = {}
    for split in [s for s in (val, test) if s is not None]:
        raw_eval[split.name] = {
            "images": cache.images(split),
            "text": cache.text(split.captions),
            "txt2img": split.txt2img,
        }
    executor = _executor(cfg)
    if executor == "ray":
        from rdistill.ray.pools import init_ray

        init_ray(cfg.ray)
    device = _device(cfg, executor)
    train_arrays, evals, eval_of, entries, jobs = {}, {}, {}, {}, []
    for ts in sets:
        feats, unit, side = _text_side(ts, cache, cfg, protocol)
        key = "unit" if unit else "raw"
        if key not in evals:
            evals[key] = {k: {**v, "text": _unit(v["text"]) if unit else v["text"]} for k, v in raw_eval.items()}
        eval_of[ts.name] = key
        train_arrays[ts.name] = {"train_images": ts.images, "pair_image": ts.pair_image, "train_text": feats}
        if ts.soft_labels is not None:
            train_arrays[ts.name]["soft_labels"] = ts.soft_labels
        settings = _settings(cfg, protocol, ts)
        workers = _workers(cfg, ts, device, executor)
        threads = max(1, int(ev.cpus_per_worker)) if device == "cpu" else 0
        for student in protocol.students:
            spec = StudentSpec(student, ev.image_weights, protocol.features, ev.image_size)
            ids = []
            for r in range(ev.runs):
                run_id = f"{_set_id(ts.name, ts.path, ts.kind)}__{_slug(student)}__r{r}"
                jobs.append(
                    RunJob(
                        run_id, ts.name, spec, settings, run_seed(cfg.seed, student, r), r, workers, device, threads
                    )
                )
                ids.append(run_id)
            entries[(ts.name, student)] = {
                "set": ts.name,
                "set_path": ts.path,
                "kind": ts.kind,
                "method": ts.info.get("method", "unknown"),
                "student": student,
                "protocol": protocol.name,
                "select": ev.select,
                "pairs": ts.num_pairs,
                "skipped": dict(ts.skipped),
                "text_side": side,
                "text_unit": unit,
                "lr_image": settings.lr_image,
                "lr_text": settings.lr_text,
                "soft_labels": settings.soft_labels or None,
                "image_tensors": ts.images.dtype != np.uint8,
                "image_trainable": ev.image_trainable,
                "workers": workers,
                "run_ids": ids,
            }
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    from rdistill.eval.runner import load_done, run_local, run_ray

    done = load_done(runs_dir, jobs)
    todo = [j for j in jobs if j.run_id not in done]
    log.info(
        "evaluate: %d sets x %d students x %d runs = %d runs (%d done) on %s (%s)",
        len(sets),
        len(protocol.students),
        ev.runs,
        len(jobs),
        len(done),
        executor,
        device,
    )
    t0 = time.perf_counter()
    if todo:
        if executor == "ray":
            new = run_ray(
                todo,
                train_arrays,
                evals,
                eval_of,
                runs_dir,
                out / "_work" / "ray_train",
                ev.cpus_per_worker,
                ev.gpus_per_worker,
            )
        else:
            new = run_local(todo, train_arrays, evals, eval_of, runs_dir)
        done.update(new)
    t_runs = time.perf_counter() - t0
    results = []
    for entry in entries.values():
        recs = [done[i] for i in entry["run_ids"]]
        results.append(
            {
                **{k: v for k, v in entry.items() if k != "run_ids"},
                **summarize_runs(recs, ev.select),
                "seconds": {
                    k: round(sum(r["seconds"][k] for r in recs), 3)
                    for k in ("total", "train", "eval", "frozen_features")
                },
                "cpu_seconds": {
                    k: round(sum(r.get("cpu_seconds", {}).get(k, 0.0) for r in recs), 3)
                    for k in ("total", "train", "eval")
                },
            }
        )
    summary = {
        "format": 1,
        "protocol": protocol.name,
        "select": ev.select,
        "select_note": SELECT_TEST_NOTE if ev.select == "test" else "epochs selected on the val split",
        "eval_data": {
            "source": data.source,
            "kind": data.kind,
            "splits": {k: {"images": v.num_images, "captions": len(v.captions)} for k, v in data.splits.items()},
        },
        "text_encoder": protocol.text_encoder,
        "students": list(protocol.students),
        "image_weights": ev.image_weights,
        "image_trainable": ev.image_trainable,
        "image_features": protocol.features,
        "settings": {
            "epochs": ev.epochs,
            "eval_every": ev.eval_every,
            "batch_size": ev.batch_size,
            "runs": ev.runs,
            "temperature": ev.temperature,
            "image_size": ev.image_size,
            "momentum": ev.momentum,
            "weight_decay": ev.weight_decay,
        },
        "executor": executor,
        "device": device,
        "results": results,
        "runs_this_time": len(todo),
        "runs_reused": len(jobs) - len(todo),
        "seconds": {
            "total": round(time.perf_counter() - t_start, 3),
            "read_sets": round(t_sets, 3),
            "eval_images": round(cache.seconds["images"], 3),
            "text_features": round(cache.seconds["text"], 3),
            "runs_wall": round(t_runs, 3),
        },
        "output": str(out),
    }
    atomic_write_json(out / "eval.json", summary)
    from rdistill.eval.report import write_eval_html

    write_eval_html(out / "eval.html", summary)
    clear_output(out, ("_work",), ())
    atomic_write_text(out / SUCCESS, "")
    return summary


def print_summary(summary: dict) -> None:
    from rdistill.eval.report import text_table

    print(text_table(summary))
    print(f"eval: {Path(summary['output']) / 'eval.json'}, {Path(summary['output']) / 'eval.html'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rdistill.evaluate", description="Train student CLIPs on distilled sets; report IR/TR@1/5/10."
    )
    p.add_argument("--train", nargs="+", required=True, help="distilled sets (shards + manifest.parquet)")
    p.add_argument("--eval-data", required=True, help="Karpathy-style .json, WebDataset eval shards, or toy")
    p.add_argument("--eval-images", help="image root of a Karpathy-style file (default: its folder)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--protocol", choices=("pds", "lors"), help="evaluate.protocol")
    p.add_argument("--select", choices=("val", "test"), help="evaluate.select")
    add_common_args(p, upstream=False)
    return p


def _overrides(args) -> list[str]:
    out = []
    if args.protocol:
        out.append(f"evaluate.protocol={args.protocol}")
    if args.select:
        out.append(f"evaluate.select={args.select}")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        build_parser(),
        argv,
        lambda args, cfg: run_evaluate(
            args.train, args.eval_data, args.output, cfg, eval_images=args.eval_images, overwrite=args.overwrite
        ),
        print_summary,
        _overrides,
    )


if __name__ == "__main__":
    sys.exit(main())
