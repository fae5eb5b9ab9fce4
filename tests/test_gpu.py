"""The model and step paths on a GPU (bf16 autocast, channels_last), without ffcv or DALI.

Skipped without CUDA; `test_step_runs_on_cpu` is the CPU twin.
"""
import numpy as np
import pytest
import torch

from ecvl_fast import dist as D
from ecvl_fast.config import Config, ModelCfg, RunCfg, Stage1Cfg, Stage2Cfg
from ecvl_fast.loaders.dali_pipeline import CLIP_MEAN, CLIP_STD
from ecvl_fast.train import build_run, train_step

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def fixed_batch(device, n=64):
    """A learnable toy problem: class c is a constant image of brightness c/9, normalised like CLIP."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    x = (labels.float() / 9 * 255)[:, None, None, None].expand(n, 3, 32, 32) + torch.randn(n, 3, 32, 32, generator=g) * 8
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        x = x.to(torch.bfloat16)
    return x.to(device), labels.to(device)


def run_steps(device_name: str, loss: str, steps: int = 30):
    cfg = Config(model=ModelCfg(name="ecvl-tiny-vit"), run=RunCfg(device=device_name),
                 stage1=Stage1Cfg(epochs=1, lr=2e-3, loss=loss, warmup_epochs=0.1))
    d = D.setup(device_name)
    run = build_run(cfg, d, {"classes": CLASSES}, steps_per_epoch=steps)
    images, labels = fixed_batch(d.device)
    first = train_step(run, images, labels)["loss"]
    for _ in range(steps - 2):
        train_step(run, images, labels)
    last = train_step(run, images, labels)["loss"]
    return float(first), float(last), run


@pytest.mark.parametrize("loss", ["prompt-ce", "clip"])
def test_step_runs_on_cpu(loss):
    first, last, run = run_steps("cpu", loss)
    assert last < first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss", ["prompt-ce", "clip"])
def test_step_runs_on_gpu_in_bf16(loss):
    first, last, run = run_steps("cuda", loss)
    assert torch.isfinite(torch.tensor(last)) and last < first
    assert next(run.net.parameters()).is_cuda
    images, _ = fixed_batch(torch.device("cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        raw = run.net.clip.encode_image(images)  # the encoder's matmuls run in bf16
        img, _ = run.net(images)
    assert raw.dtype == torch.bfloat16 and img.dtype == torch.float32  # normalize autocasts to fp32


@pytest.mark.parametrize("device_name", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_stage2_step_feeds_the_momentum_bank(device_name):
    """Adapter step on frozen encoders; per-sample L_DCVL lands in the bank (numba.cuda on GPU)."""
    cfg = Config(model=ModelCfg(name="ecvl-tiny-vit"), run=RunCfg(device=device_name),
                 stage2=Stage2Cfg(init="none", lr=1e-2, epochs=1))
    d = D.setup(device_name)
    run = build_run(cfg, d, {"classes": CLASSES, "train_labels": np.arange(64) % 10}, steps_per_epoch=20, stage=2)
    images, labels = fixed_batch(d.device)
    views, idx = [images, images.flip(-1)], torch.arange(64)
    first = float(train_step(run, views, labels, idx)["loss"])
    for _ in range(18):
        train_step(run, views, labels, idx)
    last = float(train_step(run, views, labels, idx)["loss"])
    assert last < first
    assert not any(p.requires_grad for p in run.net.parameters())
    run.bank.end_epoch()
    m, seen = run.bank.m.cpu(), run.bank.seen.cpu().bool()
    assert seen.all() and m.mean().item() == pytest.approx(0.5, abs=1e-4) and run.bank.m.device.type == d.device.type
