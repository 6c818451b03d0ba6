"""Students and text encoders: weights from a local directory, the authors' projection head and caption
cleaning, tiny offline encoders."""

import os
import re

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rdistill.models.students import (  # noqa: E402
    StudentError,
    StudentSpec,
    TextEncoder,
    blip_caption,
    build_image_model,
    parse_text_encoder,
    projection_head,
)


def _reference_pre_caption(caption, max_words=50):
    """The authors' data/flickr30k_dataset.py pre_caption, verbatim in logic."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    caption_words = caption.split(" ")
    if len(caption_words) > max_words:
        caption = " ".join(caption_words[:max_words])
    return caption


def test_blip_caption_is_the_authors_pre_caption():
    for c in ["A man (in RED) runs!!  fast.", "  two dogs; one cat: ~fun~ ", " ".join(f"w{i}" for i in range(40))]:
        assert blip_caption(c, 30) == _reference_pre_caption(c, 30)


def test_student_weights_from_a_local_directory(tmp_path):
    import torch

    torch.manual_seed(1)
    model, dim = build_image_model(StudentSpec("rdistill-tiny-resnet", "random", "logits", 32))
    assert dim == 1000 and model(torch.zeros(2, 3, 32, 32)).shape == (2, 1000)
    torch.save(model.state_dict(), tmp_path / "rdistill-tiny-resnet.pth")
    torch.manual_seed(2)
    loaded, _ = build_image_model(StudentSpec("rdistill-tiny-resnet", str(tmp_path), "logits", 32))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(StudentError, match=r"holds no checkpoint of rdistill-tiny-vit.*rdistill-tiny-vit\.pth"):
        build_image_model(StudentSpec("rdistill-tiny-vit", str(tmp_path), "logits", 32))
    with pytest.raises(StudentError, match="unknown timm model 'no_such_net'"):
        build_image_model(StudentSpec("no_such_net", "random"))
    pooled, pdim = build_image_model(StudentSpec("rdistill-tiny-vit", "random", "pooled", 32))
    assert pdim == 64 and pooled(torch.zeros(1, 3, 32, 32)).shape == (1, 64)


def test_projection_head_is_linear_gelu_linear_dropout_residual_layernorm():
    import torch

    torch.manual_seed(0)
    head = projection_head(12, 20, dropout=0.1).eval()
    x = torch.randn(5, 12)
    p = head.projection(x)
    want = torch.nn.functional.layer_norm(
        head.fc(torch.nn.functional.gelu(p)) + p, (20,), head.layer_norm.weight, head.layer_norm.bias
    )
    assert torch.allclose(head(x), want, atol=1e-6)
    assert [n for n, _ in head.named_parameters()] == [
        "projection.weight",
        "projection.bias",
        "fc.weight",
        "fc.bias",
        "layer_norm.weight",
        "layer_norm.bias",
    ]


def test_text_encoders_offline_and_their_names():
    assert parse_text_encoder("clip:ViT-L-14/openai").name == "clip:ViT-L-14/openai"
    assert parse_text_encoder("bert:bert-base-uncased").model == "bert-base-uncased"
    with pytest.raises(StudentError, match="evaluate.text_encoder"):
        parse_text_encoder("gpt:x")
    bert = TextEncoder(parse_text_encoder("bert:rdistill-tiny"))
    a = bert.encode(["a red circle", "a blue square on white"])
    b = TextEncoder(parse_text_encoder("bert:rdistill-tiny")).encode(["a red circle", "a blue square on white"])
    assert a.shape == (2, 32) and np.array_equal(a, b) and not np.allclose(a[0], a[1])
    clip = TextEncoder(parse_text_encoder("clip:rdistill-tiny"))
    assert clip.encode(["a red circle"]).shape == (1, 64)


def test_a_bert_that_cannot_be_loaded_is_one_line(tmp_path):
    """transformers' messages run over several lines (an empty directory: "Couldn't instantiate the backend
    tokenizer from one of: \\n(1) ..."); the error is one line naming the key and the model."""
    with pytest.raises(StudentError) as e:
        TextEncoder(parse_text_encoder(f"bert:{tmp_path}"))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"evaluate.text_encoder bert:{tmp_path}: cannot load")
