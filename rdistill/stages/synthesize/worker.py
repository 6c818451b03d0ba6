"""The decoder side of the synthesis stage (paper section 3.2, appendix C.4 and C.11), with no Ray in it.

:class:`Painter` is an actor body: ``__init__`` loads the unCLIP pipeline once, ``__call__`` paints a batch of
prototypes in one pipeline call. Each prototype has its own ``torch.Generator`` seeded from (run seed, prototype
id), and the pipeline draws every random number of an image from that generator alone (the embedding noise of
``noise_level``, then the initial latents), so an image does not depend on batch size, actor count or order.

The decoder is conditioned on an image embedding at the scale it was trained on (raw CLIP embeddings), while PDS
prototypes are means of L2-normalised embeddings (their norms shrink with the spread of the cluster). Each
prototype's direction is therefore rescaled to ``image_norm``: the mean raw norm of the image embeddings of its
shared pairs, which the prototype engine records from the raw vectors the embedding stage stores, or one fixed
norm given in ``synthesize.image_norm``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from rdistill.errors import RunError
from rdistill.models.unclip import DecoderError, load_unclip, pipeline_embed_dim


@dataclass(frozen=True)
class PaintSettings:
    """The authors' generation settings (appendix C.4) and the output encoding."""

    steps: int = 100
    guidance_scale: float = 5.0
    noise_level: int = 10
    negative_prompt: str = "text, watermark"
    resolution: int = 0
    image_size: int = 224
    resample: str = "lanczos"
    image_format: str = "png"
    jpeg_quality: int = 95
    image_norm: float = 0.0

    @classmethod
    def from_config(cls, c) -> PaintSettings:
        return cls(**{f: getattr(c, f) for f in cls.__dataclass_fields__})


def image_seed(seed: int, proto_id: int) -> int:
    """The seed of prototype ``proto_id``'s generator: a hash of both, so runs with nearby seeds share nothing."""
    return int(np.random.SeedSequence([seed, proto_id]).generate_state(1, dtype=np.uint64)[0] >> 1)


def condition(image_embedding: np.ndarray, image_norm: np.ndarray, fixed_norm: float = 0.0) -> np.ndarray:
    """``(n, d)`` prototypes -> ``(n, d) float32`` decoder conditioning: unit direction times the target norm
    (``fixed_norm`` when above 0, else each row's recorded ``image_norm``)."""
    x = np.asarray(image_embedding, dtype=np.float32)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    norm = np.full(len(x), fixed_norm, np.float32) if fixed_norm > 0 else np.asarray(image_norm, np.float32)
    return unit * norm[:, None]


def fill_norms(image_norm: np.ndarray) -> tuple[np.ndarray, int]:
    """Recorded norms with the missing ones filled: a pairless prototype kept as a cluster centre has no shared
    pairs, hence no recorded norm (NaN); it gets the median of the others. Returns (norms, how many filled)."""
    norms = np.asarray(image_norm, dtype=np.float32).copy()
    bad = ~np.isfinite(norms) | (norms <= 0)
    if bad.all():
        raise DecoderError("no prototype has a recorded image norm: set synthesize.image_norm")
    norms[bad] = np.median(norms[~bad])
    return norms, int(bad.sum())


def encode_image(img, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def check_dim(proto_dim: int, model: str, decoder_dim: int) -> None:
    """Prototypes must live in the decoder's conditioning space (paper: ViT-L/14 for unclip-small, 768-d)."""
    if proto_dim != decoder_dim:
        raise DecoderError(
            f"prototypes are {proto_dim}-d but decoder {model} takes {decoder_dim}-d image embeddings: "
            "embed with the CLIP the decoder was trained on (paper: ViT-L/14, 768-d, for unclip-small)"
        )


class Painter:
    """Prototype rows (``id``, ``image_embedding``, ``image_norm``, ``caption``) -> encoded images and seeds."""

    def __init__(self, model: str, settings: PaintSettings, seed: int, device: str = "cpu",
                 precision: str = "auto", threads: int = 0, expect_dim: int | None = None):  # fmt: skip
        import torch

        if device == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RunError("synthesize.pool.device is cuda but torch on this worker sees no GPU")
        self.pipe = load_unclip(model, device, precision)
        self.dim = pipeline_embed_dim(self.pipe)
        check_dim(expect_dim or self.dim, model, self.dim)
        self.model, self.settings, self.seed, self.device = model, settings, seed, device

    def paint(self, ids: np.ndarray, image_embedding: np.ndarray, image_norm: np.ndarray, captions: list[str]):
        """One pipeline call for the batch -> list of PIL images at ``settings.image_size``, and their seeds."""
        import torch
        from PIL import Image

        s = self.settings
        seeds = [image_seed(self.seed, int(i)) for i in ids]
        gens = [torch.Generator(device=self.device).manual_seed(k) for k in seeds]
        cond = torch.from_numpy(condition(image_embedding, image_norm, s.image_norm))
        size = {"height": s.resolution, "width": s.resolution} if s.resolution else {}
        with torch.inference_mode():
            out = self.pipe(
                prompt=list(captions),
                negative_prompt=[s.negative_prompt] * len(captions),
                image_embeds=cond.to(device=self.device, dtype=self.pipe.unet.dtype),
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale,
                noise_level=s.noise_level,
                generator=gens,
                output_type="pil",
                **size,
            )
        resample = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[s.resample]
        images = [im.resize((s.image_size, s.image_size), resample) for im in out.images]
        return images, seeds

    def __call__(self, batch: dict) -> dict:
        emb = batch["image_embedding"]
        emb = np.stack(emb) if emb.dtype == object else emb
        check_dim(emb.shape[1], self.model, self.dim)
        captions = [str(c) for c in batch["caption"]]
        images, seeds = self.paint(batch["id"], emb, batch["image_norm"], captions)
        fmt = self.settings.image_format
        encoded = [encode_image(im, fmt, self.settings.jpeg_quality) for im in images]
        meta = {k: v for k, v in batch.items() if k not in ("image_embedding",)}
        return {**meta, "image": np.array(encoded, dtype=object), "seed": np.array(seeds, dtype=np.int64)}


def sample_json(row: dict, model: str) -> bytes:
    """The ``ID.json`` member: the prototype's provenance (clusters, shared pairs, alignment) and the seed."""
    keys = ("id", "caption", "caption_key", "image_cluster", "text_cluster", "shared_pairs", "alignment",
            "pairless", "refilled", "seed")  # fmt: skip
    out = {k: plain(row[k]) for k in keys if k in row}
    out["model"] = model
    return json.dumps(out).encode()


def plain(v):
    """A numpy scalar as the Python value JSON and parquet rows want."""
    if isinstance(v, np.generic):
        return v.item()
    return v
