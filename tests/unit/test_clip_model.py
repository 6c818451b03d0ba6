import numpy as np
import pytest

from rdistill.models.clip import ClipEncoder, ModelError, _open_clip_crop, crop_transform, resolve_clip

pytest.importorskip("open_clip")


@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("wh", [(96, 96), (120, 70), (50, 201), (64, 64), (31, 40)])
def test_pil_crop_equals_open_clip_transform(mode, wh):
    from dataclasses import replace

    from PIL import Image

    rng = np.random.default_rng(sum(wh))
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    spec = replace(resolve_clip("rdistill-tiny", ""), resize_mode=mode)
    ours, ref = crop_transform(spec)(img), _open_clip_crop(spec)(img)
    assert ours.shape == (64, 64, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, ref)


def test_tiny_model_is_seeded_and_deterministic():
    spec = resolve_clip("rdistill-tiny", "")
    assert spec.embed_dim == 64 and spec.image_size == 64
    crops = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    a, b = ClipEncoder(spec), ClipEncoder(spec)
    np.testing.assert_array_equal(a.encode_images(crops), b.encode_images(crops))
    t = a.encode_texts(["a red circle", "a blue square"])
    assert t.shape == (2, 64) and np.isfinite(t).all() and not np.allclose(t[0], t[1])


def test_real_model_names_resolve_without_weights():
    spec = resolve_clip("ViT-L-14", "openai")  # the paper's model: metadata only, nothing downloaded
    assert (spec.embed_dim, spec.image_size, spec.interpolation) == (768, 224, "bicubic")
    with pytest.raises(ModelError, match="unknown open_clip model"):
        resolve_clip("ViT-Nope", "openai")
    with pytest.raises(ModelError, match="neither a pretrained tag"):
        resolve_clip("ViT-L-14", "not-a-tag")
