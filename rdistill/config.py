"""One typed config tree (frozen dataclasses), loaded from YAML, with dotted ``--set key=value`` overrides.

Unknown keys, wrong types and out-of-range values are refused with a :class:`ConfigError` naming the dotted key.
Defaults are the paper's settings (PDS, section 4.1 and appendix C) unless a field says otherwise.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rdistill.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "dump_config", "config_to_dict", "parse_override"]


def _f(default, *, lo=None, hi=None, choices=None, doc="", runtime=False):
    """A config field. ``runtime`` fields change how a stage runs, not what it produces: a finished or half-done
    stage resumes under new values of them (batch sizes, pool sizes, block sizes)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "doc": doc, "runtime": runtime})


@dataclass(frozen=True)
class EmbeddingsConfig:
    normalize: bool = _f(
        True, doc="L2-normalise rows before pruning and clustering (cosine geometry); retrieval is always cosine"
    )
    on_invalid: str = _f("skip", choices=("skip", "error"), doc="rows with NaN/inf or a zero vector: skip and count")
    key_column: str = _f("", doc="metadata column with the sample key; empty: the first of key, image_path")
    caption_column: str = _f("", doc="metadata column with the caption; empty: the first of caption, text")
    block_rows: int = _f(65536, lo=1024, doc="rows read per block in streaming passes", runtime=True)
    cache_gb: float = _f(
        2.0, lo=0.0, doc="keep the prepared (float32) store in RAM between passes if it fits", runtime=True
    )


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = _f(0.2, lo=0.0, hi=0.99, doc="fraction of least-aligned pairs dropped (authors' default 0.2)")


@dataclass(frozen=True)
class ClusterConfig:
    num_pairs: int = _f(100, lo=1, doc="M: clusters per modality, the distilled set size")
    points_per_centroid: int = _f(64, lo=1, doc="k-means training sample per centroid")
    max_sample: int = _f(
        1_000_000, lo=1, doc="cap on the k-means training sample (rows; memory ~ max_sample x d x 8 B)"
    )
    niter: int = _f(10, lo=0, doc="Lloyd iterations after seeding")
    init: str = _f("auto", choices=("auto", "kmeans++", "random"), doc="seeding; auto = k-means++ up to 10k clusters")
    seed_points_per_centroid: int = _f(8, lo=1, doc="k-means++ seeds from at most this many sample rows per centroid")
    refine_rounds: int = _f(
        64,
        lo=0,
        doc="split-merge refinement rounds at most, until no move pays (0 disables); after the first only the "
        "clusters the last moves touched are re-evaluated, so rounds are cheap",
    )
    refine_niter: int = _f(0, lo=0, doc="Lloyd iterations after each refinement round (0: local relabelling only)")
    final_niter: int = _f(3, lo=0, doc="Lloyd iterations after refinement, when it moved anything")
    min_gain_ratio: float = _f(
        1.0,
        lo=0.0,
        doc="a split-merge move is taken when its split gain exceeds this times the Ward cost of its merge; below 1 "
        "it also takes moves that Ward's cost (an upper bound: the merged rows may go elsewhere) rejects",
    )
    shard_rows: int = _f(
        65536,
        lo=64,
        doc="k-means sample rows per shard: the unit spread over the k-means actors (fixed by the "
        "config, not by the cluster, so any cluster shape gives the same centroids)",
    )
    gpu: bool = _f(
        False,
        doc="every search on GPU (k-means actors, assignment, merge costs, captions); needs faiss-gpu, "
        "checked at start",
    )


@dataclass(frozen=True)
class MatchConfig:
    dense_max: int = _f(4096, lo=1, doc="dense lapjv up to this M, sparse LAPJV (scipy) above")


@dataclass(frozen=True)
class PrototypesConfig:
    pairless: str = _f("keep", choices=("keep", "drop", "refill"), doc="matches without shared pairs (appendix C.3)")


@dataclass(frozen=True)
class CaptionsConfig:
    retrieve: bool = _f(True, doc="retrieve the nearest real caption for each text prototype")


@dataclass(frozen=True)
class RayConfig:
    address: str = _f(
        "",
        doc="Ray cluster to join; empty: RAY_ADDRESS, else a running job's cluster, else a local instance",
        runtime=True,
    )
    num_cpus: int = _f(
        0, lo=0, doc="CPUs of a local instance started by rdistill (0: all of this machine's)", runtime=True
    )
    data_progress: bool = _f(False, doc="Ray Data's own progress bars (rdistill shows its own)", runtime=True)


@dataclass(frozen=True)
class PoolConfig:
    """How a model stage runs on Ray: a fixed-size pool of actors, each holding one copy of the model."""

    actors: int = _f(
        0, lo=0, doc="actors in the pool (0: one per GPU of the cluster, else half its CPUs)", runtime=True
    )
    device: str = _f("auto", choices=("auto", "cpu", "cuda"), doc="auto: cuda when the cluster has GPUs", runtime=True)
    gpus_per_actor: float = _f(1.0, lo=0.0, doc="GPUs each actor reserves when device is cuda", runtime=True)
    cpus_per_actor: float = _f(
        1.0, lo=0.0, doc="CPUs each actor reserves (also its torch threads on CPU)", runtime=True
    )
    precision: str = _f("auto", choices=("auto", "fp16", "bf16", "fp32"), doc="auto: fp16 on GPU, fp32 on CPU")


@dataclass(frozen=True)
class EmbedConfig:
    model: str = _f("ViT-L-14", doc="open_clip model name (paper: ViT-L-14), or rdistill-tiny (random init, offline)")
    pretrained: str = _f("openai", doc="open_clip pretrained tag or a local checkpoint path; empty: random init")
    image_keys: str = _f("jpg,jpeg,png,webp", doc="shard member extensions read as the image, first present wins")
    caption_key: str = _f("txt", doc="member extension holding the caption as plain text")
    json_key: str = _f("json", doc="member extension of the JSON metadata, read when the text member is missing")
    json_caption_field: str = _f("caption", doc="field of the JSON member holding the caption")
    batch_size: int = _f(256, lo=1, doc="samples per model call", runtime=True)
    decode_batch: int = _f(
        64, lo=1, doc="decoded samples per block handed from the CPU readers to the model", runtime=True
    )
    decode_cpus: float = _f(1.0, lo=0.0, doc="CPUs each shard reader task reserves", runtime=True)
    shard_retries: int = _f(
        3, lo=0, doc="re-reads of a shard after an I/O error before the run fails naming it", runtime=True
    )
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass(frozen=True)
class SynthesizeConfig:
    model: str = _f(
        "stabilityai/stable-diffusion-2-1-unclip-small",
        doc="diffusers model id or local path of a StableUnCLIPImg2ImgPipeline, or rdistill-tiny (random init)",
    )
    steps: int = _f(100, lo=1, doc="denoising steps (authors: 100)")
    guidance_scale: float = _f(5.0, lo=0.0, doc="classifier-free guidance (authors: 5.0)")
    noise_level: int = _f(10, lo=0, doc="noise added to the image embedding (authors: 10)")
    negative_prompt: str = _f("text, watermark", doc="authors' negative prompt")
    resolution: int = _f(0, lo=0, doc="generation height and width in pixels (0: the model's default)")
    image_size: int = _f(224, lo=1, doc="output images are resized to this square size (authors: 224, LANCZOS)")
    resample: str = _f("lanczos", choices=("lanczos", "bicubic", "bilinear"), doc="resize filter")
    image_format: str = _f("png", choices=("png", "jpg"), doc="image member format in the output shards")
    jpeg_quality: int = _f(95, lo=1, hi=100, doc="quality when image_format is jpg")
    image_norm: float = _f(
        0.0, lo=0.0, doc="norm of the image embedding given to the decoder; 0: each prototype's recorded raw norm"
    )
    batch_size: int = _f(8, lo=1, doc="prototypes per decoder call", runtime=True)
    shard_size: int = _f(1000, lo=1, doc="prototypes per output shard (the unit of resume)")
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass(frozen=True)
class JobConfig:
    """What ``python -m rdistill.pds`` reads; ``--input`` and ``--embeddings`` on its command line win."""

    input: str = _f("", doc="WebDataset shards to embed (directory, glob, brace pattern, URL)")
    embeddings: str = _f("", doc="an existing embedding store (clip-retrieval / LAION layout): skips embed")
    toy_shards: int = _f(0, lo=0, doc="with no input: generate this many toy shards of real images (the demo)")
    toy_per_shard: int = _f(200, lo=1, doc="samples per generated toy shard")
    synthesize: bool = _f(True, doc="run the synthesis stage (false: stop after the prototypes)")
    report_images: int = _f(48, lo=0, doc="images on the report's contact sheet")


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation harness (``python -m rdistill.evaluate``): students trained on a distilled set, judged by
    retrieval recall. Defaults are the PDS protocol (authors' code, junhyeok9712/PDS, and paper section 4.1); empty
    or 0 values take the protocol's (or, for learning rates, the set's ``distilled.json``) default."""

    protocol: str = _f(
        "pds",
        choices=("pds", "lors"),
        doc="pds: timm students + frozen CLIP text; lors: nfnet_l0 + frozen BERT CLS (MTT-VL / LoRS)",
    )
    select: str = _f(
        "val",
        choices=("val", "test"),
        doc="epoch selection on the val split (test: the reference "
        "code's best-on-test choice, for parity with published numbers; marked wherever shown)",
    )
    students: str = _f(
        "",
        doc="comma-separated timm image models, or rdistill-tiny-resnet / rdistill-tiny-vit "
        "(random init, offline); empty: pds nf_resnet50,vit_tiny_patch16_224; lors nfnet_l0",
    )
    image_weights: str = _f(
        "hub",
        doc="hub (timm's pretrained weights, needs a network or its cache), random, "
        "or a directory holding STUDENT.safetensors / .pth / .bin or STUDENT/model.safetensors",
    )
    image_trainable: bool = _f(
        True,
        doc="fine-tune the image backbone (paper 4.1); false: train the text head "
        "only (the reference code's default), image features cached once",
    )
    image_features: str = _f(
        "auto",
        choices=("auto", "logits", "pooled"),
        doc="what the image model outputs: "
        "logits (1000-d classifier, pds) or pooled features (lors); auto: the protocol's",
    )
    image_size: int = _f(224, lo=8, doc="square bicubic resize of every image (authors: 224), CLIP mean/std")
    text_encoder: str = _f(
        "",
        doc="frozen text encoder: clip:MODEL[/PRETRAINED] (open_clip, or clip:rdistill-tiny)"
        " or bert:NAME_OR_PATH (transformers, or bert:rdistill-tiny); empty: pds "
        "clip:ViT-L-14/openai, lors bert:bert-base-uncased",
    )
    train_text: str = _f(
        "auto",
        choices=("auto", "npy", "caption"),
        doc="text side of a training set: its "
        "distilled .npy vectors (auto when present) or its captions through the text encoder",
    )
    text_norm: str = _f(
        "auto",
        choices=("auto", "unit", "raw"),
        doc="features of the captions the head sees (a caption-based set's and the eval "
        "captions'): unit (L2-normalised) or raw encoder outputs (the authors'; the head is not scale-invariant, so "
        "results differ); auto: pds unit, lors raw. A set's .npy vectors are used as stored",
    )
    caption_preprocess: str = _f(
        "blip",
        choices=("blip", "none"),
        doc="captions as the authors' pre_caption "
        "cleans them (lower case, punctuation off, max_words) before encoding",
    )
    max_words: int = _f(30, lo=1, doc="words kept per caption by the blip preprocessing (authors: 30)")
    head_dropout: float = _f(0.1, lo=0.0, hi=0.9, doc="dropout of the text projection head (authors: 0.1)")
    temperature: float = _f(0.07, lo=1e-4, doc="fixed InfoNCE temperature (authors: 0.07)")
    epochs: int = _f(
        100,
        lo=1,
        doc="E: the reference trains passes 0..E (E + 1 of them) and evaluates after "
        "passes 0, eval_every, 2 eval_every, ..., E",
    )
    eval_every: int = _f(10, lo=1, doc="evaluate after every this many passes (and the last)")
    batch_size: int = _f(128, lo=1, doc="global batch (authors: 128), split over data-parallel workers")
    lr_image: float = _f(
        0.0,
        lo=0.0,
        doc="SGD learning rate of the image backbone; 0: the set's learned one "
        "(distilled.json), else pds 0.2, lors 0.1",
    )
    lr_text: float = _f(
        0.0, lo=0.0, doc="SGD learning rate of the text head; 0: the set's learned one, else pds 0.2, lors 0.1"
    )
    momentum: float = _f(0.9, lo=0.0, hi=1.0, doc="SGD momentum (authors: 0.9)")
    weight_decay: float = _f(5e-4, lo=0.0, doc="SGD weight decay (authors: 5e-4)")
    decay_epoch: int = _f(
        0,
        lo=0,
        doc="learning rates x decay_factor from this pass on; 0: epochs // 2 + 1 "
        "(the reference's MultiStepLR milestone)",
    )
    decay_factor: float = _f(0.1, lo=0.0, hi=1.0, doc="learning-rate decay (authors: 0.1)")
    runs: int = _f(5, lo=1, doc="runs (seeds) per set and student; the table reports their mean and std")
    random_subset: bool = _f(
        True, doc="add a random-subset row of each set's size when the eval data has a train split"
    )
    full_data: bool = _f(
        False,
        doc="add the full-data row (the whole train split, one pair per caption; images "
        "held in memory: n x image_size^2 x 3 bytes)",
    )
    workers: int = _f(
        0,
        lo=0,
        doc="data-parallel workers per run; 0: 1 up to data_parallel_pairs pairs, else one "
        "per GPU of the cluster (at least 1)",
        runtime=True,
    )
    data_parallel_pairs: int = _f(
        20000, lo=1, doc="sets larger than this train data-parallel when workers is 0", runtime=True
    )
    executor: str = _f(
        "auto",
        choices=("auto", "local", "ray"),
        doc="ray: every run a Ray Train TorchTrainer, the "
        "runs in parallel over the cluster; local: in this process, one after another; auto: ray "
        "when ray.address or RAY_ADDRESS is set",
        runtime=True,
    )
    device: str = _f(
        "auto",
        choices=("auto", "cpu", "cuda"),
        doc="auto: cuda when the cluster (or this machine) has GPUs",
        runtime=True,
    )
    cpus_per_worker: float = _f(
        1.0,
        lo=0.0,
        doc="CPUs each training worker reserves, and its torch threads on CPU (the local executor's too: "
        "more threads than free cores slow small models down many times)",
        runtime=True,
    )
    gpus_per_worker: float = _f(1.0, lo=0.0, doc="GPUs each training worker reserves on cuda", runtime=True)
    eval_batch_size: int = _f(256, lo=1, doc="images per forward pass when computing eval features", runtime=True)


@dataclass(frozen=True)
class CoresetConfig:
    """The coreset baselines (``python -m rdistill.coreset``, PDS tables 2 and 5) on L2-normalised CLIP features
    of the embedding store; M is ``cluster.num_pairs`` (``--num-pairs``)."""

    method: str = _f(
        "random",
        choices=("random", "herding", "kcenter", "clip-score", "text-prototype", "image-prototype"),
        doc="the selection rule",
    )
    pool: int = _f(
        100_000,
        lo=1,
        doc="herding and k-center select from a uniform candidate pool of this many rows "
        "(memory: pool x 2d x 4 bytes); the whole store when it is smaller",
    )
    shard_size: int = _f(1000, lo=1, doc="pairs per output shard")


@dataclass(frozen=True)
class ExpertsConfig:
    """Expert trajectories (MTT-VL / LoRS ``buffer.py``): students trained on the full real data, their parameters
    saved after every epoch; cached under ``distill.experts_dir`` by a fingerprint of data, student and these
    settings, and reused by every distillation that asks for the same."""

    num_experts: int = _f(20, lo=1, doc="trajectories (authors: 20, MTT-VL paper 3.2 and sh/buffer_flickr.sh)")
    epochs: int = _f(10, lo=1, doc="epochs per trajectory (authors: 10)")
    batch_size: int = _f(128, lo=1, doc="real pairs per SGD step (authors: 128)")
    lr_image: float = _f(0.1, lo=0.0, doc="SGD lr of the image backbone (authors' lr_teacher_img: 0.1)")
    lr_text: float = _f(0.1, lo=0.0, doc="SGD lr of the text head (authors' lr_teacher_txt: 0.1)")
    momentum: float = _f(0.0, lo=0.0, hi=1.0, doc="SGD momentum (authors' buffer.py --mom default: 0)")
    weight_decay: float = _f(0.0, lo=0.0, doc="SGD weight decay (authors' --l2 default: 0)")
    temperature: float = _f(0.07, lo=1e-4, doc="InfoNCE temperature (authors: 0.07)")
    seed: int = _f(0, lo=0, doc="seed of the experts (not the distillation's: experts are shared across seeds)")
    executor: str = _f(
        "auto",
        choices=("auto", "local", "ray"),
        doc="ray: each expert a Ray Train TorchTrainer, all in parallel over the cluster; local: one after another "
        "in this process; auto: ray when ray.address or RAY_ADDRESS is set",
        runtime=True,
    )
    cpus_per_expert: float = _f(1.0, lo=0.0, doc="CPUs each expert's worker reserves (its torch threads on CPU)",
                                runtime=True)  # fmt: skip
    gpus_per_expert: float = _f(1.0, lo=0.0, doc="GPUs each expert's worker reserves on cuda", runtime=True)


@dataclass(frozen=True)
class TrajectoryConfig:
    """Trajectory matching (MTT-VL Algorithm 1; TESLA-VL and LoRS add to it). A 0 (or empty) value means the
    method's published value for ``distill.preset`` and the number of pairs (docs/methods/*.md say where each
    comes from); set it to override."""

    iterations: int = _f(0, lo=0, doc="distillation iterations (0: the method's default)")
    syn_steps: int = _f(0, lo=0, doc="R-hat: student steps unrolled on the synthetic set per iteration (0: 8)")
    expert_epochs: int = _f(0, lo=0, doc="R: the target is the expert this many epochs after the start (0: 1)")
    max_start_epoch: int = _f(0, lo=0, doc="T+: start epochs are drawn from 0 .. T+ - 1 (0: 2, LoRS 500 pairs 3)")
    mini_batch: int = _f(0, lo=0, doc="synthetic pairs per student step (0: the method's default, at most M)")
    lr_image: float = _f(0.0, lo=0.0, doc="SGD lr of the synthetic pixels (0: the method's default)")
    lr_text: float = _f(0.0, lo=0.0, doc="SGD lr of the synthetic text vectors (0: the method's default)")
    lr_lr: float = _f(1e-2, lo=0.0, doc="SGD lr of the learnable student learning rates (authors: 1e-2)")
    lr_init_image: float = _f(0.1, lo=0.0, doc="initial student lr of the image backbone (authors: 0.1)")
    lr_init_text: float = _f(0.1, lo=0.0, doc="initial student lr of the text head (authors: 0.1)")
    momentum: float = _f(0.5, lo=0.0, hi=1.0, doc="SGD momentum of the synthetic data (authors: 0.5)")
    momentum_lr: float = _f(0.5, lo=0.0, hi=1.0, doc="SGD momentum of the learnable lrs (authors: 0.5)")
    temperature: float = _f(0.0, lo=0.0, doc="student InfoNCE / WBCE temperature (0: 0.07; LoRS COCO 500: 0.1)")
    merge_branches: str = _f(
        "auto",
        choices=("auto", "true", "false"),
        doc="one normalised distance over image and text parameters together instead of the sum of two "
        "(LoRS --merge_loss_branches); auto: the method's setting for the preset",
    )
    sampling: str = _f(
        "auto",
        choices=("auto", "fresh", "walk"),
        doc="mini-batches: fresh (a new random permutation each step, MTT-VL) or walk (through one permutation, "
        "LoRS); auto: the method's",
    )
    memory_saving: bool = _f(
        False,
        doc="TESLA's constant-memory unroll: replay the R steps one at a time in reverse instead of keeping the "
        "whole unrolled graph (activation memory constant in R; the R + 1 flat parameter vectors are kept)",
    )
    first_order: bool = _f(
        False,
        doc="with memory_saving: drop the Hessian coupling between steps, as the LoRS code does (its gradients "
        "then differ from MTT's); false: the exact gradients of the unroll",
    )
    checkpoint_every: int = _f(0, lo=0, doc="iterations between checkpoints (0: distill.checkpoint_every)")


@dataclass(frozen=True)
class TeslaVLConfig(TrajectoryConfig):
    memory_saving: bool = _f(True, doc="constant-memory unroll (TESLA); see distill.mtt_vl.memory_saving")


@dataclass(frozen=True)
class LoRSConfig(TrajectoryConfig):
    memory_saving: bool = _f(True, doc="constant-memory unroll (TESLA, as LoRS runs it)")
    sim_type: str = _f("lowrank", choices=("lowrank", "full"), doc="similarity matrix: a I + L R^T alpha / rank, "
                       "or a full M x M matrix")  # fmt: skip
    sim_rank: int = _f(0, lo=0, doc="rank of the low-rank part (0: the preset's for this budget)")
    sim_alpha: float = _f(0.0, lo=0.0, doc="alpha of the low-rank part (0: the preset's for this budget)")
    lr_sim: float = _f(0.0, lo=0.0, doc="SGD lr of the similarity parameters (0: the preset's for this budget)")
    momentum_sim: float = _f(0.5, lo=0.0, hi=1.0, doc="SGD momentum of the similarity parameters (authors: 0.5)")
    loss: str = _f("wbce", choices=("wbce", "bce", "infonce"), doc="student loss on soft labels (authors: WBCE)")


@dataclass(frozen=True)
class CovMatchConfig:
    """CovMatch (rdistill.methods.covmatch.CovMatchSettings: the same names; 0 / negative = the paper's value)."""

    iterations: int = _f(0, lo=0, doc="0: 10,000 (20,000 at > 200 pairs)")
    rho: float = _f(0.0, lo=0.0, doc="scale of the real cross-covariance; 0: 2 at <= 100 pairs, else 1")
    feat_weight: float = _f(-1.0, doc="lambda of the feature terms; < 0: 0.1 up to 200 pairs, else 0.6")
    lr_image: float = _f(1.0, lo=0.0, doc="SGD lr of the synthetic pixels")
    lr_text: float = _f(1.0, lo=0.0, doc="SGD lr of the synthetic text vectors")
    momentum: float = _f(0.5, lo=0.0, hi=1.0, doc="SGD momentum of the synthetic data")
    batch_real: int = _f(256, lo=1, doc="real pairs per iteration")
    batch_syn: int = _f(0, lo=0, doc="synthetic pairs per iteration; 0: all")
    reset_every: int = _f(50, lo=1, doc="online model reset period (iterations)")
    projection_dim: int = _f(2304, lo=1, doc="width of the linear projections")
    normalize_features: bool = _f(False, doc="L2-normalise encoder features before the statistics (not the paper's)")
    model_lr_image: float = _f(0.01, lo=0.0, doc="online model: SGD lr of the image encoder")
    model_lr_text: float = _f(0.1, lo=0.0, doc="online model: SGD lr of the text head and projections")
    model_momentum: float = _f(0.9, lo=0.0, hi=1.0, doc="online model: SGD momentum")
    model_weight_decay: float = _f(5e-4, lo=0.0, doc="online model: SGD weight decay")
    temperature: float = _f(0.07, lo=1e-4, doc="InfoNCE temperature of the online model's step")
    checkpoint_every: int = _f(100, lo=1, doc="iterations between checkpoints")
    log_every: int = _f(10, lo=1, doc="iterations between log lines")


@dataclass(frozen=True)
class MDMConfig:
    """MDM (rdistill.methods.mdm.MDMSettings: the same names)."""

    iterations: int = _f(3000, lo=0, doc="distillation iterations")
    lr_image: float = _f(1000.0, lo=0.0, doc="SGD lr of the synthetic pixels")
    lr_text: float = _f(1000.0, lo=0.0, doc="SGD lr of the synthetic text vectors")
    momentum: float = _f(0.5, lo=0.0, hi=1.0, doc="SGD momentum of the synthetic data")
    grad_clip: float = _f(1.0, lo=0.0, doc="max L2 norm of the (pixels, text) gradient")
    batch_real: int = _f(256, lo=1, doc="real pairs per iteration")
    batch_syn: int = _f(64, lo=1, doc="synthetic pairs per iteration")
    w_nce: float = _f(1.0, lo=0.0, doc="weight of the InfoNCE term")
    w_agr: float = _f(0.8, lo=0.0, doc="weight of the agreement energy")
    w_dis: float = _f(0.8, lo=0.0, doc="weight of the discrepancy energy")
    sigma_agr: float = _f(0.5, lo=1e-6, doc="geodesic kernel width (agreement)")
    sigma_dis: float = _f(0.5, lo=1e-6, doc="geodesic kernel width (discrepancy)")
    diversity_agr: float = _f(1.0, lo=0.0, doc="weight of the synthetic-synthetic kernel term (agreement)")
    diversity_dis: float = _f(1.0, lo=0.0, doc="weight of the synthetic-synthetic kernel term (discrepancy)")
    sqrt_energy: bool = _f(True, doc="the energy as sqrt(MMD^2), else MMD^2")
    off_diagonal: bool = _f(True, doc="within-set kernel means without the diagonal")
    temperature: float = _f(0.07, lo=1e-4, doc="InfoNCE temperature")
    merge_alpha: float = _f(0.5, lo=0.0, doc="expert merge strength (0: no experts needed)")
    merge_k: float = _f(2.0, lo=1.0, doc="Model-Stock k")
    min_start_epoch: int = _f(1, lo=0, doc="expert epochs drawn from min_start_epoch ..")
    max_start_epoch: int = _f(10, lo=0, doc=".. max_start_epoch")
    anchor: str = _f("fixed", choices=("fixed", "fresh"), doc="merge anchor: a fresh student per run or per iteration")
    init: str = _f("kmeans", choices=("kmeans", "given"), doc="kmeans (joint-space k-means) or the framework's draw")
    kmeans_max_rows: int = _f(50_000, lo=1, doc="k-means on at most this many real pairs")
    kmeans_niter: int = _f(20, lo=0, doc="k-means iterations")
    feature_batch: int = _f(256, lo=1, doc="pairs per feature batch", runtime=True)
    checkpoint_every: int = _f(100, lo=1, doc="iterations between checkpoints")
    log_every: int = _f(10, lo=1, doc="iterations between log lines")


@dataclass(frozen=True)
class DistillConfig:
    """The optimisation-based methods (``python -m rdistill.distill``): the students they train (defaults: the
    MTT-VL / LoRS protocol, ImageNet-pretrained trainable ``nfnet_l0`` pooled features, frozen
    ``bert-base-uncased`` CLS features, a trainable text head), the expert trajectories and each method's
    settings under ``distill.<method>`` (``mtt_vl``, ``tesla_vl``, ``lors``, ``covmatch``, ``mdm``)."""

    method: str = _f("mtt-vl", choices=("mtt-vl", "tesla-vl", "lors", "covmatch", "mdm"), doc="--method")
    num_pairs: int = _f(100, lo=1, doc="M: pairs in the distilled set (--num-pairs)")
    preset: str = _f(
        "flickr30k", choices=("flickr30k", "coco"), doc="whose published per-budget settings fill the 0 values"
    )
    student: str = _f("nfnet_l0", doc="timm image model (or rdistill-tiny-resnet / rdistill-tiny-vit)")
    image_weights: str = _f("hub", doc="hub, random, or a directory of checkpoints (as evaluate.image_weights)")
    image_features: str = _f("pooled", choices=("logits", "pooled"), doc="pooled (num_classes=0, nfnet 2304-d) or "
                             "logits")  # fmt: skip
    image_size: int = _f(224, lo=8, doc="square bicubic resize of the real images (authors: 224)")
    text_encoder: str = _f(
        "bert:bert-base-uncased",
        doc="frozen text encoder whose (raw) features the synthetic text lives among: bert:NAME_OR_PATH or "
        "clip:MODEL[/PRETRAINED] (bert:rdistill-tiny / clip:rdistill-tiny offline)",
    )
    caption_preprocess: str = _f("blip", choices=("blip", "none"), doc="captions cleaned as the authors' pre_caption")
    max_words: int = _f(30, lo=1, doc="words kept per caption by the blip preprocessing")
    head_dropout: float = _f(0.1, lo=0.0, hi=0.9, doc="dropout of the text head (authors: 0.1)")
    max_real_pairs: int = _f(
        0,
        lo=0,
        doc="use at most this many real pairs (a seeded sample; 0: all). The real images are held in memory as "
        "float32: n_images x 3 x image_size^2 x 4 bytes",
    )
    device: str = _f("auto", choices=("auto", "cpu", "cuda"), doc="auto: cuda when this machine has one", runtime=True)
    threads: int = _f(0, lo=0, doc="torch threads of the distillation on CPU (0: torch's default)", runtime=True)
    checkpoint_every: int = _f(50, lo=1, doc="iterations between checkpoints (a killed run resumes from the last)")
    log_every: int = _f(10, lo=1, doc="iterations between log lines / loss-history points")
    experts_dir: str = _f(
        "",
        doc="shared storage of expert trajectories (reused across distillations); empty: $RDISTILL_EXPERTS_DIR, "
        "else ~/.cache/rdistill/experts",
        runtime=True,
    )
    preview_size: int = _f(0, lo=0, doc="PNG previews resized to this size (0: image_size)")
    write_init: bool = _f(False, doc="also write the initial set (the real pairs drawn) into OUTPUT/init, to compare")
    shard_size: int = _f(1000, lo=1, doc="pairs per output shard")
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    mtt_vl: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    tesla_vl: TeslaVLConfig = field(default_factory=TeslaVLConfig)
    lors: LoRSConfig = field(default_factory=LoRSConfig)
    covmatch: CovMatchConfig = field(default_factory=CovMatchConfig)
    mdm: MDMConfig = field(default_factory=MDMConfig)


@dataclass(frozen=True)
class Config:
    seed: int = _f(0, lo=0, doc="seed of every random choice (sampling, seeding)")
    executor: str = _f(
        "auto",
        choices=("auto", "local", "ray"),
        doc="where the prototype engine's passes run: ray (tasks over the cluster's workers), local (this process); "
        "auto: ray when ray.address or RAY_ADDRESS is set (as under ray job submit), else local",
        runtime=True,
    )
    progress: bool = _f(True, doc="progress bars on stderr", runtime=True)
    checkpoint_seconds: float = _f(
        60.0,
        lo=0.0,
        doc="how often a streaming pass of the prototype engine saves its reduction so far (a killed "
        "driver resumes after the parts it had reduced); 0: after every part",
        runtime=True,
    )
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    prototypes: PrototypesConfig = field(default_factory=PrototypesConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    job: JobConfig = field(default_factory=JobConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# The sections each stage's result depends on: a finished stage is redone only when one of these changed.
STAGE_SECTIONS = {
    "embed": ("embed",),
    "prototypes": ("seed", "embeddings", "prune", "cluster", "match", "prototypes", "captions"),
    "synthesize": ("seed", "synthesize"),
}


def _check_value(key: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("lo") is not None and value < meta["lo"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {meta['lo']}")
    if meta.get("hi") is not None and value > meta["hi"]:
        raise ConfigError(f"{key}: {value!r} is above the maximum {meta['hi']}")
    return value


def _build(cls: type, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (known under {prefix or 'top level'}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(prefix + name, fields[name], tp, value)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {p} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is parsed as YAML (numbers, booleans, strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key.strip()}: cannot parse value {raw!r}: {e}") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides, validated."""
    tree: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: expected a mapping at top level")
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    try:
        return _build(Config, tree)
    except ConfigError as e:
        where = f" (from {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, stage: str | None = None) -> str:
    """The resolved config as YAML; with ``stage``, only the sections that stage's result depends on."""
    if stage is None:
        return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    tree = {k: v for k, v in _result_fields(cfg).items() if k in STAGE_SECTIONS[stage]}
    return yaml.safe_dump(tree, sort_keys=False)


def _result_fields(node) -> dict:
    """The config as a dict without its ``runtime`` fields: what a stage's result depends on."""
    out = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _result_fields(value)
        elif not f.metadata.get("runtime"):
            out[f.name] = value
    return out
