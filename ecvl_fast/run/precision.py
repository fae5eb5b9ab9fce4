"""Precision is one switch, `run.precision`: "bf16", "fp16", "fp32", or "auto" (bf16 on CUDA,
fp32 on CPU). bf16 and fp16 run the encoders under autocast (the losses stay fp32, losses.fp32);
fp16 adds a GradScaler (V100/T4 have no bf16); fp32 runs everything in fp32 (debugging)."""

from __future__ import annotations

import torch

from ecvl_fast import EcvlError
from ecvl_fast.config import CHOICES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype of this run on this device."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise EcvlError(f"run.precision={name!r}: choose one of {', '.join(CHOICES['run', 'precision'])}")
    return DTYPES[name]


def autocast(device: torch.device, dt: torch.dtype):
    """Autocast to `dt`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dt if dt != torch.float32 else torch.bfloat16, enabled=dt != torch.float32)


def scaler(device: torch.device, dt: torch.dtype) -> torch.amp.GradScaler:
    """A loss scaler for fp16; a pass-through otherwise (scale() returns the loss, step() steps)."""
    return torch.amp.GradScaler(device.type, enabled=dt == torch.float16)


def inputs(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """Images as the encoders take them: channels_last, in the compute dtype on GPU (autocast
    would cast them anyway); fp32 on CPU, where autocast casts per op."""
    x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dt) if x.is_cuda else x
