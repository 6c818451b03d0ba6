"""The torch dtype a model runs in, shared by the CLIP encoder and the unCLIP decoder."""

from __future__ import annotations


def torch_dtype(precision: str, device: str):
    """``precision`` (auto, fp16, bf16, fp32) on ``device`` -> a torch dtype; auto is fp16 on GPU, fp32 on CPU."""
    import torch

    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
