"""CLIP models for the embedding stage: open_clip by name and pretrained tag, a local checkpoint, or a tiny
random-init architecture defined here (tests and the offline demo).

Image preprocessing is split in two so that the CPU readers ship small uint8 arrays to the model actors:
:func:`crop_transform` (decode side: resize and centre-crop, the PIL part of open_clip's eval transform) and
:meth:`ClipEncoder.encode_images` (model side: scale to [0, 1] and normalise, what ``ToTensor`` + ``Normalize`` do).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdistill.errors import InputError
from rdistill.models.precision import torch_dtype

log = logging.getLogger(__name__)

TINY = "rdistill-tiny"

# 3.4M parameters; a 64-px ViT and a 2-layer text tower with open_clip's own BPE vocabulary (ships in the package).
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_SEED = 20260101  # weights of the tiny model are a pure function of this seed
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelError(InputError, ValueError):
    """A model that cannot be resolved or loaded; the message names it."""


@dataclass(frozen=True)
class ClipSpec:
    """What both sides of the embedding stage need to know about the model, resolved without loading weights."""

    model: str
    pretrained: str  # tag, local checkpoint path, or "" (random init)
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str


def resolve_clip(model: str, pretrained: str) -> ClipSpec:
    """Look up ``model`` (an open_clip name or ``rdistill-tiny``) and its preprocessing without loading weights."""
    if model == TINY:
        if pretrained and not Path(pretrained).is_file():
            raise ModelError(f"embed.pretrained: {TINY} takes no pretrained tag, only a local checkpoint path "
                             f"(got {pretrained!r}); leave it empty for the seeded random init")  # fmt: skip
        cfg, pre = TINY_CLIP_CONFIG, {}
    else:
        import open_clip  # seconds to import: not for the tiny model

        cfg = open_clip.get_model_config(model)
        if cfg is None:
            known = ", ".join(open_clip.list_models()[:8])
            raise ModelError(f"embed.model: unknown open_clip model {model!r} (e.g. {known}, ... or {TINY})")
        pre = {}
        if pretrained and not Path(pretrained).is_file():
            pre = open_clip.get_pretrained_cfg(model, pretrained)
            if not pre:
                tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
                raise ModelError(
                    f"embed.pretrained: {pretrained!r} is neither a pretrained tag of {model} (tags: {tags}) "
                    "nor an existing checkpoint file"
                )
    size = cfg["vision_cfg"]["image_size"]
    return ClipSpec(
        model=model,
        pretrained=pretrained,
        embed_dim=int(cfg["embed_dim"]),
        image_size=int(size if isinstance(size, int) else size[0]),
        mean=tuple(pre.get("mean", OPENAI_MEAN)),
        std=tuple(pre.get("std", OPENAI_STD)),
        interpolation=pre.get("interpolation", "bicubic"),
        resize_mode=pre.get("resize_mode", "shortest"),
    )


def crop_transform(spec: ClipSpec):
    """PIL RGB image -> ``(S, S, 3) uint8``: open_clip's eval transform up to (not including) ``ToTensor``.

    For the usual resize modes this is plain PIL, equal pixel for pixel to torchvision's ``Resize`` +
    ``CenterCrop`` (a test checks it), so the CPU readers need not import torch and open_clip (seconds each).
    """
    from PIL import Image

    size = spec.image_size
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(spec.interpolation)
    if spec.resize_mode not in ("shortest", "squash") or resample is None:
        return _open_clip_crop(spec)

    def apply(img) -> np.ndarray:
        img = img.convert("RGB")
        w, h = img.size
        if spec.resize_mode == "squash":
            return np.asarray(img.resize((size, size), resample), dtype=np.uint8)
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)

    return apply


def _open_clip_crop(spec: ClipSpec):
    import open_clip
    from torchvision import transforms as T

    full = open_clip.image_transform(
        spec.image_size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
        resize_mode=spec.resize_mode,
    )
    crop = T.Compose([t for t in full.transforms if not isinstance(t, T.ToTensor | T.Normalize)])

    def apply(img) -> np.ndarray:
        return np.asarray(crop(img.convert("RGB")), dtype=np.uint8)

    return apply


def build_tiny_clip():
    """The ``rdistill-tiny`` model with weights drawn from :data:`TINY_SEED`, the same on every machine."""
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return open_clip.CLIP(**TINY_CLIP_CONFIG)


class ClipEncoder:
    """One loaded CLIP: uint8 crops and captions in, raw (un-normalised) float32 embeddings out."""

    def __init__(self, spec: ClipSpec, device: str = "cpu", precision: str = "auto"):
        import open_clip
        import torch

        self.spec, self.device, self.dtype = spec, device, torch_dtype(precision, device)
        if spec.model == TINY:
            model = build_tiny_clip()
            if spec.pretrained:
                model.load_state_dict(_load_state(spec.pretrained))
        else:
            try:
                # a pretrained tag, a local checkpoint path, or None (seeded random init, for benchmarks)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(TINY_SEED)
                    model = open_clip.create_model(spec.model, pretrained=spec.pretrained or None, device="cpu")
            except Exception as e:  # download failures, bad checkpoints: name the model, keep the cause
                raise ModelError(f"cannot load open_clip {spec.model} / {spec.pretrained or 'random'}: {e}") from e
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(spec.model) if spec.model != TINY else open_clip.SimpleTokenizer()
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(spec.mean, device=device).view(shape)
        self.std = torch.tensor(spec.std, device=device).view(shape)

    def encode_images(self, crops: np.ndarray) -> np.ndarray:
        """``(n, S, S, 3) uint8`` -> ``(n, d) float32`` raw image embeddings."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            x = ((x - self.mean) / self.std).to(self.dtype)
            return self.model.encode_image(x).float().cpu().numpy()

    def encode_texts(self, captions: list[str]) -> np.ndarray:
        """``n`` captions -> ``(n, d) float32`` raw text embeddings (tokens truncated to the context length)."""
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(list(captions)).to(self.device)
            return self.model.encode_text(tokens).float().cpu().numpy()


def _load_state(path: str) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
