"""What every optimisation-based distillation method gets from the framework, and what it gives back.

A method is a module with ``run(ctx: MethodContext) -> Synthetic`` (registered in :data:`METHODS`). The framework
(:mod:`rdistill.methods.driver`) loads the real pairs once (:class:`RealData`: CLIP-normalised images and the
frozen text encoder's features of the captions), draws the initial set (:class:`Synthetic`: ``num_pairs`` real
pairs chosen with the seed), and hands the method a :class:`MethodContext`: fresh students built as the config
says, the expert trajectories (trained on first use, cached on shared storage), checkpoints that carry the RNG
states, and a progress log. The method returns the optimised set; the framework writes it in rdistill's distilled
format (images as float tensors plus PNG previews, text as vectors in ``ctx.text_space``, learned learning rates
and soft labels for the students).

Shapes: images ``(n, 3, S, S) float32`` in the students' normalised pixel space
(:func:`rdistill.models.students.normalize_images`), text ``(n, d) float32`` in the frozen encoder's raw space.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

METHODS = {
    "mtt-vl": "rdistill.methods.trajectory:run_mtt",
    "tesla-vl": "rdistill.methods.trajectory:run_tesla",
    "lors": "rdistill.methods.trajectory:run_lors",
    "covmatch": "rdistill.methods.covmatch:run",
    "mdm": "rdistill.methods.mdm:run",
}
# methods that train on expert trajectories (the others may still ask for them: MDM's model merging does)
TRAJECTORY_METHODS = ("mtt-vl", "tesla-vl", "lors")
CHECKPOINT = "checkpoint.pt"


def config_section(method: str) -> str:
    """The config section of a method's settings: ``distill.<section>`` (``mtt-vl`` -> ``mtt_vl``)."""
    return method.replace("-", "_")


def settings_from_config(cls, cfg, section: str, shared_keys: tuple[str, ...]):
    """A method's settings dataclass ``cls`` from ``cfg.distill.<section>`` (same field names): fields the section
    lacks keep ``cls``'s defaults, and ``shared_keys`` absent or 0 there take ``distill.*``'s."""
    import dataclasses

    shared = getattr(cfg, "distill", None)
    sec = getattr(shared, section, None)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(sec, f.name, None) if sec is not None else None
        if f.name in shared_keys and not value:
            value = getattr(shared, f.name, None) if shared is not None else None
        if value is not None:
            values[f.name] = value
    return cls(**values)


def load_method(method: str) -> Callable:
    """The ``run`` function of ``method`` (imported on demand)."""
    import importlib

    module, _, name = METHODS[method].partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class RealData:
    """The real training pairs, loaded once. ``images (n_img, 3, S, S) float32`` CLIP-normalised; ``text (N, d)
    float32`` frozen text-encoder features of the captions (in ``ctx.text_space``); ``captions`` N strings;
    ``pair_image (N,) int64``: the image of each pair (several captions may share one)."""

    images: torch.Tensor
    text: torch.Tensor
    captions: list[str]
    pair_image: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.pair_image.shape[0])

    def pair_images(self, idx: torch.Tensor) -> torch.Tensor:
        """Images of the pairs ``idx`` ``(k,) int64`` -> ``(k, 3, S, S)``."""
        return self.images[self.pair_image[idx]]


@dataclass
class Synthetic:
    """A distilled set being optimised: ``images (M, 3, S, S) float32`` (same pixel space as :class:`RealData`),
    ``text (M, d) float32`` (in ``ctx.text_space``); ``captions`` / ``source_index``: the real pair each synthetic
    pair was initialised from; learned learning rates of the students' image backbone and text head; ``soft_labels
    (M, M) float32``: LoRS's similarity matrix; ``extra``: a JSON-able record for ``distilled.json`` ``source``."""

    images: torch.Tensor
    text: torch.Tensor
    captions: list[str]
    source_index: list[int]
    lr_image: float | None = None
    lr_text: float | None = None
    soft_labels: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def rng_states() -> dict:
    """torch (CPU and CUDA), numpy global and python ``random`` states."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class MethodContext:
    """What a method's ``run`` gets (see the module docstring).

    ``cfg``: the merged :class:`rdistill.config.Config` (method settings under ``distill.<method>``, shared ones
    under ``distill``); ``work_dir``: where checkpoints go (the output's ``_work``); ``experts_fn``: returns the
    expert trajectories (the driver passes :func:`rdistill.methods.experts.load_or_train_experts` bound to the
    data); ``image_dim``: the image student's output width (found by building one when not given)."""

    def __init__(
        self,
        cfg,
        method: str,
        real: RealData,
        init: Synthetic,
        *,
        num_pairs: int,
        seed: int,
        device: str,
        text_space: str,
        image_size: int,
        work_dir: str | Path,
        experts_fn: Callable[[], list[list[dict]]] | None = None,
        image_dim: int | None = None,
        progress: bool = False,
    ):
        self.cfg, self.method, self.real, self.init = cfg, method, real, init
        self.num_pairs, self.seed, self.device = int(num_pairs), int(seed), device
        self.text_space, self.image_size = text_space, int(image_size)
        self.work_dir = Path(work_dir)
        self._experts_fn, self._experts = experts_fn, None
        self._image_dim = image_dim
        self.history: list[dict] = []  # {"iteration", "total", **metrics}, in order
        self.resumed_from: int | None = None
        self._bar, self._progress = None, progress

    # ------------------------------------------------------------------------------------------------- students

    @staticmethod
    def student_spec_of(cfg, image_size: int):
        """The :class:`rdistill.models.students.StudentSpec` of ``distill.student`` at ``image_size``."""
        from rdistill.models.students import StudentSpec

        d = cfg.distill
        return StudentSpec(d.student, d.image_weights, d.image_features, int(image_size))

    def student_spec(self):
        return self.student_spec_of(self.cfg, self.image_size)

    def image_student(self) -> torch.nn.Module:
        """A fresh image encoder (``distill.student``: a timm model or a tiny one; weights per
        ``distill.image_weights``); random parts drawn from torch's global generator. ``(n, 3, S, S)`` ->
        ``(n, image_dim)``."""
        from rdistill.models.students import build_image_model

        model, dim = build_image_model(self.student_spec())
        self._image_dim = dim
        return model

    @property
    def image_dim(self) -> int:
        if self._image_dim is None:
            with torch.random.fork_rng(devices=[]):
                self.image_student()
        return int(self._image_dim)

    @property
    def text_dim(self) -> int:
        return int(self.real.text.shape[1])

    def text_head(self) -> torch.nn.Module:
        """A fresh trainable text head (the students' :func:`rdistill.models.students.projection_head`,
        ``text_dim -> image_dim``, dropout ``distill.head_dropout``)."""
        from rdistill.models.students import projection_head

        return projection_head(self.text_dim, self.image_dim, self.cfg.distill.head_dropout)

    def experts(self) -> list[list[dict]]:
        """Expert trajectories: per expert, the state dicts after epochs ``0..E`` (epoch 0: the initialisation),
        each ``{"image": state_dict, "text": state_dict}`` of :meth:`image_student` / :meth:`text_head`. Trained
        on first call (Ray Train runs, :mod:`rdistill.methods.experts`) and cached on disk; the torch, numpy and
        python random states are the same after the call whether they were trained or loaded."""
        if self._experts is None:
            if self._experts_fn is None:
                raise RuntimeError("this context has no expert trajectories (no experts_fn)")
            # training them (first use) seeds and draws from the global generators: a method's result must not
            # depend on whether its experts were cached, so they come back as they were
            states = rng_states()
            try:
                self._experts = self._experts_fn()
            finally:
                set_rng_states(states)
        return self._experts

    # ---------------------------------------------------------------------------------------------- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / CHECKPOINT

    def load_checkpoint(self) -> dict | None:
        """The state saved by the last :meth:`save_checkpoint` of this run, or None; restores the torch, numpy
        and python RNG states and the log history saved with it."""
        path = self.checkpoint_path
        if not path.exists():
            return None
        doc = torch.load(path, map_location="cpu", weights_only=False)
        set_rng_states(doc["rng"])
        self.history = list(doc.get("history") or [])
        self.resumed_from = int(doc["iteration"])
        log.info("%s: resuming from the checkpoint after iteration %d", self.method, self.resumed_from)
        return doc["state"]

    def save_checkpoint(self, state: dict, iteration: int) -> None:
        """Save ``state`` (tensors, optimiser states, generators' states...) atomically with the RNG states and
        the log history; the testing hook ``RDISTILL_FAULT_KILL_AFTER=distill:N`` kills the process after the
        checkpoint of iteration N."""
        from rdistill.io.outputs import atomic_path, fault_point

        doc = {"iteration": int(iteration), "state": state, "rng": rng_states(), "history": list(self.history)}
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(doc, tmp)
        fault_point("distill", int(iteration))

    # ---------------------------------------------------------------------------------------------------- log

    def log(self, iteration: int, total: int, **metrics) -> None:
        """Record the metrics (floats) of ``iteration`` of ``total``: kept in :attr:`history` (distill.json),
        logged, and shown on the progress bar."""
        rec = {"iteration": int(iteration), "total": int(total)}
        rec.update({k: float(v) for k, v in metrics.items()})
        self.history.append(rec)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if k not in ("iteration", "total"))
        log.info("%s %d/%d: %s", self.method, iteration, total, shown)
        if self._progress:
            if self._bar is None:
                from rdistill.metrics import progress

                self._bar = progress(total, self.method, True, unit="it")
            self._bar.n = int(iteration)
            self._bar.set_postfix_str(shown, refresh=True)

    @property
    def logged(self) -> list[tuple[int, dict]]:
        """:attr:`history` as ``(iteration, metrics)`` pairs."""
        skip = ("iteration", "total")
        return [(r["iteration"], {k: v for k, v in r.items() if k not in skip}) for r in self.history]

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
