"""Student CLIPs of the evaluation protocols: a timm image model, a frozen text encoder and a trainable text head.

* **PDS protocol** (junhyeok9712/PDS ``src/networks.py``, paper 4.1): ImageNet-pretrained ``nf_resnet50`` and
  ``vit_tiny_patch16_224`` whose 1000-d classifier outputs are the image features; the frozen CLIP text encoder
  (ViT-L/14, 768-d); a :class:`ProjectionHead` 768 -> 1000.
* **LoRS / MTT-VL protocol** (silicx/LoRS_Distill, princetonvisualai/multimodal_dataset_distillation):
  ``nfnet_l0`` with ``num_classes=0`` (2304-d pooled features), frozen ``bert-base-uncased`` CLS features (768-d),
  a :class:`ProjectionHead` 768 -> 2304.

Image weights come from timm's hub (``hub``), a local directory of checkpoint files, or a random init;
``rdistill-tiny-resnet`` and ``rdistill-tiny-vit`` are small random-init versions of the two PDS students (tests,
the offline demo). Text encoders are named ``clip:MODEL[/PRETRAINED]`` (open_clip through
:mod:`rdistill.models.clip`, ``clip:rdistill-tiny`` included) or ``bert:NAME_OR_PATH`` (transformers;
``bert:rdistill-tiny`` is a 2-layer random BERT with a character vocabulary built in code). Such a name is also
the *text space* a distilled set's ``.npy`` vectors live in (:mod:`rdistill.io.distilled`).
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdistill.errors import InputError

log = logging.getLogger(__name__)

PROTOCOLS = {
    "pds": {
        "students": ("nf_resnet50", "vit_tiny_patch16_224"),
        "features": "logits",
        "text_encoder": "clip:ViT-L-14/openai",
        "lr": 0.2,
        "text_unit": True,
    },
    "lors": {
        "students": ("nfnet_l0",),
        "features": "pooled",
        "text_encoder": "bert:bert-base-uncased",
        "lr": 0.1,
        "text_unit": False,
    },
}
TINY_STUDENTS = {
    # architecture, overrides: the same families as the PDS students, a few ten thousand parameters
    "rdistill-tiny-resnet": ("nf_resnet50", {"channels": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "stem_chs": 16}),
    "rdistill-tiny-vit": ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 64, "num_heads": 2}),
}
TINY = "rdistill-tiny"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the authors normalise every student's input with CLIP's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = ("{n}.safetensors", "{n}.pth", "{n}.bin", "{n}/model.safetensors", "{n}/pytorch_model.bin")


class StudentError(InputError, ValueError):
    """A student or text encoder that cannot be built; the message names it and the config key."""


def blip_caption(caption: str, max_words: int = 30) -> str:
    """The authors' ``pre_caption`` (from BLIP): lower case, ``.!"()*#:;~`` to spaces, runs of spaces collapsed,
    at most ``max_words`` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


# ---------------------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class StudentSpec:
    """An image student: a timm model (or a tiny one), its weights, what it outputs, its input size."""

    name: str
    weights: str = "hub"  # hub | random | a directory of checkpoint files
    features: str = "logits"  # logits (the 1000-d classifier) | pooled (num_classes=0)
    image_size: int = 224


def _weight_file(name: str, weights: str) -> str:
    root = Path(weights)
    if not root.is_dir():
        raise StudentError(f"evaluate.image_weights: {weights} is neither hub, random nor a directory")
    for pattern in WEIGHT_FILES:
        path = root / pattern.format(n=name)
        if path.is_file():
            return str(path)
    wanted = ", ".join(p.format(n=name) for p in WEIGHT_FILES)
    raise StudentError(f"evaluate.image_weights: {weights} holds no checkpoint of {name} (looked for {wanted})")


def build_image_model(spec: StudentSpec):
    """``spec`` -> ``(torch.nn.Module, out_dim)``: images ``(n, 3, S, S) float32`` (CLIP-normalised) in,
    ``(n, out_dim) float32`` features out. Random weights come from torch's global generator (seed it first)."""
    import timm

    arch, kwargs = spec.name, {}
    if spec.name in TINY_STUDENTS:
        arch, kwargs = TINY_STUDENTS[spec.name]
        kwargs = dict(kwargs)
        if "vit" in arch:
            kwargs["patch_size"] = max(1, spec.image_size // 4)
    elif not timm.is_model(spec.name):
        raise StudentError(f"evaluate.students: unknown timm model {spec.name!r} (or {', '.join(TINY_STUDENTS)})")
    cfg = timm.get_pretrained_cfg(arch)
    if "vit" in arch or (cfg is not None and getattr(cfg, "fixed_input_size", False)):
        kwargs["img_size"] = spec.image_size
    if spec.features == "pooled":
        kwargs.update(num_classes=0, global_pool="avg")
    pretrained, overlay = False, None
    if spec.weights not in ("hub", "random") or (spec.weights == "hub" and spec.name not in TINY_STUDENTS):
        pretrained = True
        if spec.weights != "hub":
            overlay = {"file": _weight_file(spec.name, spec.weights)}
    try:
        model = timm.create_model(arch, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # download failures, bad checkpoints: name the model and the key, keep the cause
        where = "timm's hub" if overlay is None else overlay["file"]
        cause = " ".join(str(e).split())
        raise StudentError(
            f"cannot build student {spec.name} with weights from {where}: {cause}; set "
            "evaluate.image_weights to a directory of checkpoints, or random"
        ) from e
    dim = model.num_features if spec.features == "pooled" else model.num_classes
    return model, int(dim)


def normalize_images(images_uint8, mean=CLIP_MEAN, std=CLIP_STD):
    """``(n, S, S, 3) uint8`` tensor -> ``(n, 3, S, S) float32``, scaled to [0, 1] and CLIP-normalised (the
    authors' ``ToTensor`` + ``Normalize``)."""
    import torch

    x = images_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def projection_head(embedding_dim: int, projection_dim: int, dropout: float = 0.1):
    """The authors' ``ProjectionHead``: Linear, GELU, Linear, Dropout, residual from the first Linear, LayerNorm.
    ``(n, embedding_dim)`` -> ``(n, projection_dim)``."""
    import torch
    from torch import nn

    class ProjectionHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.projection = nn.Linear(embedding_dim, projection_dim)
            self.gelu = nn.GELU()
            self.fc = nn.Linear(projection_dim, projection_dim)
            self.dropout = nn.Dropout(dropout)
            self.layer_norm = nn.LayerNorm(projection_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            projected = self.projection(x)
            x = self.dropout(self.fc(self.gelu(projected)))
            return self.layer_norm(x + projected)

    return ProjectionHead()


# ------------------------------------------------------------------------------------------------------------ text


@dataclass(frozen=True)
class TextEncoderSpec:
    """``kind`` (clip | bert) and ``model`` / ``pretrained`` of a frozen text encoder; ``name`` is its space."""

    kind: str
    model: str
    pretrained: str = ""

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.model}" + (f"/{self.pretrained}" if self.pretrained else "")


def parse_text_encoder(name: str) -> TextEncoderSpec:
    """``clip:ViT-L-14/openai``, ``clip:rdistill-tiny``, ``bert:bert-base-uncased``, ``bert:/path/to/bert`` ->
    :class:`TextEncoderSpec`."""
    kind, sep, rest = name.partition(":")
    if not sep or kind not in ("clip", "bert") or not rest:
        raise StudentError(f"evaluate.text_encoder: {name!r} is not clip:MODEL[/PRETRAINED] or bert:NAME_OR_PATH")
    if kind == "bert":
        return TextEncoderSpec("bert", rest)
    model, _, pretrained = rest.partition("/")
    return TextEncoderSpec("clip", model, pretrained)


def clip_space(model: str, pretrained: str) -> str:
    """The text space of vectors embedded by open_clip ``model`` / ``pretrained`` (as the embed stage runs it)."""
    return TextEncoderSpec("clip", model, pretrained).name


def _tiny_bert():
    import tempfile

    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer(str(path), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20260102)
        model = BertModel(config)
    return tokenizer, model


class TextEncoder:
    """A frozen text encoder: captions in, ``(n, d) float32`` raw features out (CLIP text embeddings, or BERT's
    CLS hidden state, as the reference codes take them)."""

    def __init__(self, spec: TextEncoderSpec, device: str = "cpu"):
        self.spec, self.device = spec, device
        if spec.kind == "clip":
            from rdistill.models.clip import ClipEncoder, ModelError, resolve_clip

            try:
                self.clip = ClipEncoder(resolve_clip(spec.model, spec.pretrained), device, "fp32")
            except ModelError as e:
                raise StudentError(f"evaluate.text_encoder {spec.name}: {e}") from None
            self.dim = self.clip.spec.embed_dim
            return
        if spec.model == TINY:
            self.tokenizer, self.model = _tiny_bert()
        else:
            from transformers import AutoTokenizer, BertModel

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
                self.model = BertModel.from_pretrained(spec.model)
            except Exception as e:  # offline, missing files: name the model and the key, keep the cause
                cause = " ".join(str(e).split())  # transformers' messages run over several lines
                raise StudentError(f"evaluate.text_encoder {spec.name}: cannot load {spec.model}: {cause}") from e
        self.model = self.model.to(device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, captions: list[str], batch_size: int = 256) -> np.ndarray:
        """``n`` captions -> ``(n, dim) float32``."""
        import torch

        out = []
        for i in range(0, len(captions), batch_size):
            chunk = list(captions[i : i + batch_size])
            if self.spec.kind == "clip":
                out.append(self.clip.encode_texts(chunk))
                continue
            enc = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            with torch.inference_mode():
                ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            out.append(hidden[:, 0, :].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
