"""A planted mixture of image-text pairs with known concepts: the ground truth for tests, benchmarks and the demo.

Each concept ``c`` has a semantic direction ``s_c``; concepts come in groups whose directions share a component,
so some concepts are close. Image and text means of a concept are ``s_c`` pushed towards a modality direction
(``e_img`` or ``e_txt``), which reproduces CLIP's modality gap: paired image and text embeddings have cosine of about
0.3 while embeddings of one modality are much closer to each other. Concept frequencies follow a Zipf law, and a
fraction of pairs is misaligned (the caption belongs to another concept), like the noisy pairs of web data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NOUNS = (
    "dog",
    "cat",
    "bicycle",
    "mountain",
    "beach",
    "kitchen",
    "guitar",
    "train",
    "bird",
    "city street",
    "pizza",
    "horse",
    "sailboat",
    "forest",
    "child",
    "skateboard",
    "bridge",
    "flower",
    "laptop",
    "market",
)
_SETTINGS = ("in the snow", "at night", "on a sunny day", "in a park", "near the water", "indoors", "in the rain")


@dataclass(frozen=True)
class PlantedConcepts:
    """The fixed part of a planted mixture: concept means and frequencies.

    img_means, txt_means: (k, d) float32, unit rows. freqs: (k,) float64, sums to 1.
    """

    img_means: np.ndarray
    txt_means: np.ndarray
    freqs: np.ndarray
    noise: float
    misaligned: float

    @property
    def num_concepts(self) -> int:
        return int(self.img_means.shape[0])


@dataclass(frozen=True)
class PlantedPairs:
    """Rows drawn from a :class:`PlantedConcepts`.

    img_emb, txt_emb: (n, d) float32 unit rows; img_concept, txt_concept: (n,) int32 (equal unless misaligned);
    captions: list of n str.
    """

    img_emb: np.ndarray
    txt_emb: np.ndarray
    img_concept: np.ndarray
    txt_concept: np.ndarray
    captions: list[str]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_concepts(
    num_concepts: int = 100,
    dim: int = 768,
    *,
    zipf: float = 1.0,
    group_size: int = 10,
    group_weight: float = 0.5,
    gap: float = 1.0,
    noise: float = 0.8,
    misaligned: float = 0.1,
    seed: int = 0,
) -> PlantedConcepts:
    """Draw concept means. ``noise`` is the norm of the per-sample noise relative to the (unit) mean before the
    sample is renormalised; ``gap`` the weight of the modality direction."""
    rng = np.random.default_rng(seed)
    num_groups = max(1, -(-num_concepts // group_size))
    groups = _unit(rng.standard_normal((num_groups, dim)))
    own = _unit(rng.standard_normal((num_concepts, dim)))
    semantic = _unit(own + group_weight * groups[np.arange(num_concepts) // group_size])
    e_img, e_txt = _unit(rng.standard_normal((2, dim)))
    img_means = _unit(semantic + gap * e_img).astype(np.float32)
    txt_means = _unit(semantic + gap * e_txt).astype(np.float32)
    freqs = 1.0 / np.arange(1, num_concepts + 1) ** zipf
    return PlantedConcepts(img_means, txt_means, freqs / freqs.sum(), noise, misaligned)


def sample_pairs(concepts: PlantedConcepts, n: int, *, seed: int | list[int] = 0) -> PlantedPairs:
    """Draw ``n`` pairs; a fraction ``concepts.misaligned`` gets the caption of a uniformly random concept."""
    rng = np.random.default_rng(seed)
    k, dim = concepts.img_means.shape
    img_concept = rng.choice(k, size=n, p=concepts.freqs).astype(np.int32)
    txt_concept = img_concept.copy()
    flip = rng.random(n) < concepts.misaligned
    txt_concept[flip] = rng.integers(0, k, size=int(flip.sum()), dtype=np.int32)
    scale = np.float32(concepts.noise / np.sqrt(dim))

    def draw(means: np.ndarray, labels: np.ndarray) -> np.ndarray:
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x *= scale
        x += means[labels]
        return _unit(x)

    img_emb = draw(concepts.img_means, img_concept)
    txt_emb = draw(concepts.txt_means, txt_concept)
    nouns = [_NOUNS[c % len(_NOUNS)] for c in range(k)]
    settings = rng.integers(0, len(_SETTINGS), size=n)
    captions = [f"a photo of a {nouns[c]} (concept {c}) {_SETTINGS[s]}" for c, s in zip(txt_concept, settings)]
    return PlantedPairs(img_emb, txt_emb, img_concept, txt_concept, captions)


def score_recovery(img_protos: np.ndarray, txt_protos: np.ndarray, concepts: PlantedConcepts) -> dict:
    """How well prototypes recover the planted concepts.

    A prototype points at the concept whose mean is nearest (cosine) to it, separately per modality. It is
    *correctly paired* when both point at the same concept, *mispaired* otherwise. A concept is *recovered* when some
    correctly paired prototype points at it. Returns recovered share, counts, and the mean cosine of the correctly
    paired prototypes to their concept's means.
    """
    img_protos = _unit(np.asarray(img_protos, dtype=np.float32))
    txt_protos = _unit(np.asarray(txt_protos, dtype=np.float32))
    img_sim = img_protos @ concepts.img_means.T
    txt_sim = txt_protos @ concepts.txt_means.T
    img_hit, txt_hit = img_sim.argmax(1), txt_sim.argmax(1)
    paired = img_hit == txt_hit
    recovered = np.unique(img_hit[paired])
    rows = np.flatnonzero(paired)
    return {
        "recovered": float(recovered.size / concepts.num_concepts),
        "recovered_concepts": int(recovered.size),
        "mispaired": int((~paired).sum()),
        "prototypes": int(img_protos.shape[0]),
        "img_cosine": float(img_sim[rows, img_hit[rows]].mean()) if rows.size else 0.0,
        "txt_cosine": float(txt_sim[rows, txt_hit[rows]].mean()) if rows.size else 0.0,
    }


def write_store(
    root: str | Path,
    concepts: PlantedConcepts,
    num_rows: int,
    *,
    rows_per_part: int = 100_000,
    seed: int = 0,
    dtype: str = "float16",
) -> list[int]:
    """Write a planted embedding store in the clip-retrieval / LAION layout, one part at a time (memory bounded by
    ``rows_per_part``). Part ``i`` is drawn with seed ``(seed, i)``. Returns the row count of each part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    counts = []
    for part, start in enumerate(range(0, num_rows, rows_per_part)):
        n = min(rows_per_part, num_rows - start)
        pairs = sample_pairs(concepts, n, seed=[seed, part])
        np.save(root / "img_emb" / f"img_emb_{part}.npy", pairs.img_emb.astype(dtype))
        np.save(root / "text_emb" / f"text_emb_{part}.npy", pairs.txt_emb.astype(dtype))
        table = pa.table(
            {
                "key": [f"{part:05d}{i:07d}" for i in range(n)],
                "caption": pairs.captions,
                "concept": pairs.img_concept,
                "caption_concept": pairs.txt_concept,
            }
        )
        pq.write_table(table, root / "metadata" / f"metadata_{part}.parquet")
        counts.append(n)
    return counts
