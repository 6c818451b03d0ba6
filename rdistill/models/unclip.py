"""unCLIP decoders for the synthesis stage: diffusers ``StableUnCLIPImg2ImgPipeline`` by model id or local path
(the authors': ``stabilityai/stable-diffusion-2-1-unclip-small``, conditioned on 768-d ViT-L/14 image embeddings),
or ``rdistill-tiny``: a random-init pipeline built here from small configs (32-px latents, tiny VAE, 1-layer CLIP
text and image parts, a tokenizer made from open_clip's bundled BPE merges), seeded, for tests and the demo.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

from rdistill.errors import InputError
from rdistill.models.precision import torch_dtype

log = logging.getLogger(__name__)

TINY = "rdistill-tiny"
TINY_EMBED_DIM = 64  # = the tiny CLIP's embedding dimension, so the demo's prototypes fit this decoder
TINY_SEED = 20260102
TINY_MERGES = 2000  # BPE merges kept from open_clip's vocabulary file: a 2,514-token vocabulary


class DecoderError(InputError, ValueError):
    """A decoder that cannot be loaded or does not fit the prototypes; the message names it."""


def _tiny_tokenizer():
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")[1 : 1 + TINY_MERGES]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_unclip():
    """The ``rdistill-tiny`` pipeline (fp32, CPU), its weights a pure function of :data:`TINY_SEED`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    d = TINY_EMBED_DIM
    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=1, projection_dim=32, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))  # fmt: skip
        # never run (the prototypes are passed as image_embeds) but the pipeline reads its dtype
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, projection_dim=d, num_hidden_layers=1, num_attention_heads=4, image_size=32,
            intermediate_size=37, patch_size=8))  # fmt: skip
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
            "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4), class_embed_type="projection",
            projection_class_embeddings_input_dim=2 * d, norm_num_groups=8, upcast_attention=True,
            use_linear_projection=True)  # fmt: skip
        vae = AutoencoderKL(
            block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))  # fmt: skip
        normalizer = StableUnCLIPImageNormalizer(embedding_dim=d)
        with torch.no_grad():  # raw CLIP image embeddings are not unit-scale: give the normaliser a real scale
            normalizer.mean.normal_(0.0, 0.2)
            normalizer.std.uniform_(0.8, 1.2)
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=None,
        image_encoder=image_encoder,
        image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
        vae=vae,
    )  # fmt: skip


def load_unclip(model: str, device: str = "cpu", precision: str = "auto"):
    """A ``StableUnCLIPImg2ImgPipeline`` on ``device``: ``rdistill-tiny``, a local directory, or a hub model id."""
    import torch
    from diffusers import StableUnCLIPImg2ImgPipeline

    dtype = torch_dtype(precision, device)
    if model == TINY:
        pipe = build_tiny_unclip()
    else:
        try:
            pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(model, torch_dtype=dtype)
        except Exception as e:  # offline hub, a path that is not a pipeline: name it, keep the cause
            raise DecoderError(f"synthesize.model: cannot load StableUnCLIPImg2ImgPipeline {model!r}: {e}") from e
    # from_pretrained already cast; casting the fp32 tiny pipeline only when asked avoids diffusers' warning
    pipe = pipe.to(device) if model != TINY or dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_decoder_source(model: str) -> None:
    """Refuse, before any actor starts, a ``synthesize.model`` that names a local directory which is missing or
    holds no diffusers pipeline (a hub id is checked when the actors load it)."""
    if model == TINY:
        return
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") != 1
    if not looks_local:
        return
    if not path.is_dir():
        raise DecoderError(f"synthesize.model: {model}: no such directory (and not a hub id of the form org/name)")
    if not (path / "model_index.json").exists():
        raise DecoderError(f"synthesize.model: {model}: not a diffusers pipeline directory (no model_index.json)")


def decoder_embed_dim(model: str) -> int | None:
    """The image-embedding dimension a decoder takes, read from its config without loading weights; ``None``
    when it cannot be known here (a hub id with no network): the actors check again once loaded."""
    if model == TINY:
        return TINY_EMBED_DIM
    path = Path(model) / "image_normalizer" / "config.json"
    if not path.exists():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "image_normalizer/config.json"))
        except Exception:
            return None
    return int(json.loads(path.read_text())["embedding_dim"])


def pipeline_embed_dim(pipe) -> int:
    return int(pipe.image_normalizer.mean.shape[-1])
