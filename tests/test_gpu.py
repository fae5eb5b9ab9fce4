"""The GPU path: the step (bf16 autocast, channels_last, no host sync), the DALI ops and the loader
on a GPU, and a short stage-2 run fed by DALI. Each GPU test has a CPU twin here or in
test_pipeline.py, which runs everywhere; the GPU ones carry the `gpu` marker and skip without CUDA
(and without DALI where they need it). `.ci/gpu-check.sh` selects them with `-m gpu`.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_helpers import images, run_leaf
from ecvl_fast.run import dist as D
from ecvl_fast.config import Config, DataCfg, ModelCfg, RunCfg, Stage1Cfg, Stage2Cfg
from ecvl_fast.loaders.dali_graph import CLIP_MEAN, CLIP_STD
from ecvl_fast.loaders.dali_loader import AugmentedLoader
from ecvl_fast.loaders.draws import AugSpec
from ecvl_fast.loaders.held import HeldLoader
from ecvl_fast.loaders.randaug_ops import OPS
from ecvl_fast.run.logs import RunLog
from ecvl_fast.bench.synthetic import fake_images
from ecvl_fast.training.loop import build_run, train_epoch, train_step

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CUDA = torch.cuda.is_available()


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
gpu_dali = gpu + [pytest.mark.skipif(not _has_dali(), reason="needs DALI")]
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]
DEVICES_DALI = ["cpu", pytest.param("cuda", marks=gpu_dali)]


def fixed_batch(device, n=64):
    """A learnable toy problem: class c is a constant image of brightness c/9, normalised like CLIP."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    x = (labels.float() / 9 * 255)[:, None, None, None].expand(n, 3, 32, 32) + torch.randn(
        n, 3, 32, 32, generator=g
    ) * 8
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        x = x.to(torch.bfloat16)
    return x.to(device), labels.to(device)


def run_steps(device_name: str, loss: str, steps: int = 30):
    cfg = Config(
        data=DataCfg(res=32),
        model=ModelCfg(name="ecvl-tiny-vit"),
        run=RunCfg(device=device_name),
        stage1=Stage1Cfg(epochs=1, lr=2e-3, loss=loss, warmup_epochs=0.1),
    )
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


@pytest.mark.parametrize("loss", ["prompt-ce", "clip"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_step_runs_on_gpu_in_bf16(loss):
    first, last, run = run_steps("cuda", loss)
    assert torch.isfinite(torch.tensor(last)) and last < first
    assert next(run.net.parameters()).is_cuda
    images, _ = fixed_batch(torch.device("cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        raw = run.net.clip.encode_image(images)  # the encoder's matmuls run in bf16
        img, _ = run.net(images)
    assert raw.dtype == torch.bfloat16 and img.dtype == torch.float32  # normalize autocasts to fp32
    assert torch.backends.cudnn.benchmark  # fixed training shapes: cuDNN tunes once


@pytest.mark.parametrize("device_name", DEVICES)
def test_predict_normalises_with_one_copy_per_device(device_name):
    """predict's preprocessing: CLIP's mean and std reach the device once, not once per batch (a
    copy from pageable memory syncs with the host), and the batch is normalised as eval does."""
    from ecvl_fast.serving.classifier import _normaliser, to_input

    device = torch.device(device_name, 0) if device_name == "cuda" else torch.device("cpu")
    assert all(a is b for a, b in zip(_normaliser(device), _normaliser(device)))
    batch = fake_images(4, 2, 32)
    x = to_input(batch, 32, device).float().cpu()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() - mean) / std
    torch.testing.assert_close(x, expected, rtol=0.02, atol=0.02)


def stage2_run(device_name: str, n: int = 64):
    cfg = Config(
        data=DataCfg(res=32),
        model=ModelCfg(name="ecvl-tiny-vit"),
        run=RunCfg(device=device_name),
        stage2=Stage2Cfg(init="none", lr=1e-2, epochs=2),
    )
    d = D.setup(device_name)
    labels = np.arange(n) % 10
    meta = {
        "classes": CLASSES,
        "train_labels": labels,
        "groups": {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]},
    }
    return build_run(cfg, d, meta, steps_per_epoch=20, stage=2)


@pytest.mark.parametrize("device_name", DEVICES)
def test_stage2_step_feeds_the_momentum_bank(device_name):
    """Adapter step on frozen encoders; per-sample L_DCVL lands in the bank (numba.cuda on GPU)."""
    run = stage2_run(device_name)
    images, labels = fixed_batch(run.d.device)
    views, idx = [images, images.flip(-1)], torch.arange(64, device=run.d.device)
    first = float(train_step(run, views, labels, idx)["loss"])
    for _ in range(18):
        train_step(run, views, labels, idx)
    last = float(train_step(run, views, labels, idx)["loss"])
    assert last < first
    assert not any(p.requires_grad for p in run.net.parameters())
    run.bank.end_epoch()
    m, seen = run.bank.m.cpu(), run.bank.seen.cpu().bool()
    assert (
        seen.all() and m.mean().item() == pytest.approx(0.5, abs=1e-4) and run.bank.m.device.type == run.d.device.type
    )


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_stage2_step_never_syncs_with_the_host():
    """Inputs already on the device, as the loader hands them over: the step (forward, L_DCVL,
    the bank's kernel, backward, AdamW, the scheduler) must not wait for the GPU once."""
    run = stage2_run("cuda")
    images, labels = fixed_batch(run.d.device)
    views, idx = [images, images.flip(-1)], torch.arange(64, device=run.d.device)
    for _ in range(2):  # warm-up: kernel compilation, allocator, the optimizer's lazy state
        train_step(run, views, labels, idx)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = train_step(run, views, labels, idx)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(terms["loss"]).item()


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not _has_dali(), reason="needs a CUDA device and DALI")
def test_op_on_gpu_matches_cpu(op):
    """Every op forced on every sample, GPU against CPU (the CPU against PIL: test_op_matches_pil).
    auto_contrast and contrast have GPU-only branches that nothing else runs."""
    imgs = images(8, 32)
    strengths, signs = np.linspace(0.25, 1, 8), [1, -1] * 4
    cpu = run_leaf(op.name, imgs, strengths, signs).astype(int)
    out = run_leaf(op.name, imgs, strengths, signs, device_id=0).astype(int)
    assert out.shape == cpu.shape
    # Rounding may differ by one, and a nearest-neighbour warp may pick the neighbouring pixel
    # where a source coordinate lands on a pixel edge; a wrong branch differs everywhere.
    diff = np.abs(out - cpu)
    assert diff.mean() < 0.5 and (diff > 1).mean() < 0.01, (op.name, diff.mean(), (diff > 1).mean())
    if op.name != "identity":
        assert (out != imgs.astype(int)).any()


def held_batches(device_name: str, slow: bool, n: int = 96, batch: int = 16):
    """Eval-mode batches (no crop, no RandAugment) of known images through a HeldLoader whose
    ring has only 2 slots, optionally with a consumer that keeps its stream busy for a while per
    batch. Returns (received float views, expected float images) in sample order."""
    imgs = fake_images(n, 7, 32)
    labels = np.arange(n) % 10
    device = torch.device(device_name)
    loader = AugmentedLoader(
        HeldLoader(imgs, labels, "sequential", batch, slots=2),
        AugSpec(res=32, train=False, randaug=False),
        device=device,
        prefetch=2,
    )
    got, index = [], []
    for views, y, idx in loader:
        if slow:  # a long step: ffcv would be refilling slots meanwhile
            torch.cuda._sleep(20_000_000) if device.type == "cuda" else time.sleep(0.02)
        got.append(views[0].float().cpu()), index.append(idx.cpu())
        assert y.device.type == idx.device.type == device.type
    order = torch.cat(index).numpy()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(imgs[order]).permute(0, 3, 1, 2).float() - mean) / std
    return torch.cat(got), expected


@pytest.mark.parametrize("device_name", DEVICES_DALI)
def test_loader_hands_over_the_right_pixels_to_a_slow_step(device_name):
    """ffcv's memory semantics (a reused pinned slot) with a step slower than the feeder: the
    images that arrive are the images of those indices (defect: a copy queued behind the step
    read a slot that had been refilled)."""
    got, expected = held_batches(device_name, slow=True)
    tol = 0.02 if device_name == "cuda" else 1e-5  # bf16 on GPU
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("device_name", DEVICES_DALI)
def test_stage2_epochs_fed_by_dali(device_name, tmp_path):
    """A short stage-2 run through the real data path: memory-driven RandAugment in DALI reading
    the bank's M, the adapter step, the bank's kernels. The loss stays finite and M moves."""
    run = stage2_run(device_name, n=128)
    imgs = fake_images(128, 3, 32)
    labels = run.meta["train_labels"]
    loader = AugmentedLoader(
        HeldLoader(imgs, labels, "balanced", 32),
        AugSpec(res=32, views=2, k=2),
        run.bank,
        device=run.d.device,
        prefetch=2,
    )
    log, ms = RunLog(tmp_path, True, 2, 2, interactive=False), []
    for epoch in range(2):
        stats = train_epoch(run, loader, epoch, log)
        assert np.isfinite(stats["train_loss"]) and stats["img_s"] > 0
        ms.append(run.bank.m.cpu().clone())
    assert ms[0].std() > 0.01 and not torch.equal(ms[0], ms[1])  # M left its zero start, then changed
    assert abs(float(ms[1].mean()) - 0.5) < 0.05  # eq. 9 centres it
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("m_by_group" in r for r in records) and all("time" in r for r in records)


def memory_dataset(folder, monkeypatch, train: int = 160, test: int = 40):
    """A dataset train.main opens like a converted one (meta.json), whose splits are read from
    memory: `make_loader` hands out HeldLoaders, with ffcv's pinned ring of slots, in place of
    ffcv Loaders (the GPU check machine has no ffcv)."""
    from ecvl_fast.loaders import ffcv_loader

    splits = {
        "train": (fake_images(train, 5, 32), np.arange(train) % 10),
        "test": (fake_images(test, 6, 32), np.arange(test) % 10),
    }
    counts = np.bincount(splits["train"][1], minlength=10)
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(
        json.dumps(
            {
                "classes": CLASSES,
                "train_counts": counts.tolist(),
                "sha256": {},
                "groups": {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]},
                "images": {name: len(y) for name, (_, y) in splits.items()},
            }
        )
    )
    for name in splits:
        (folder / f"{name}.beton").touch()  # eval_loader checks that the split is there
    split = lambda path: splits[Path(path).stem]  # noqa: E731
    monkeypatch.setattr(ffcv_loader, "read_labels", lambda path: split(path)[1])
    monkeypatch.setattr(
        ffcv_loader,
        "make_loader",
        lambda path, order, batch_size, load_res, *, workers=2, seed=0, num_classes=None, rank=0, world=1, limit=0: (
            HeldLoader(*split(path), order, batch_size, seed=seed, rank=rank, world=world, limit=limit)
        ),
    )
    return folder


@pytest.mark.parametrize("device_name", DEVICES_DALI)
def test_train_main_stage2_evaluates_checkpoints_and_resumes(device_name, tmp_path, monkeypatch):
    """The real `train.main`, stage 2 fed by DALI: stopped by SIGTERM after epoch 1 (a checkpoint,
    exit status 75), then the same call resumes at epoch 2, evaluates through DALI and reports."""
    import os
    import signal

    from ecvl_fast.run import lifecycle
    from ecvl_fast.training import loop as training
    from ecvl_fast.config import DataCfg

    data = memory_dataset(tmp_path / "data", monkeypatch)
    cfg = Config(
        data=DataCfg(path=str(data), res=32, batch_size=32, workers=1),
        model=ModelCfg(name="ecvl-tiny-vit"),
        stage2=Stage2Cfg(init="none", lr=1e-2, epochs=2),
        run=RunCfg(device=device_name, out=str(tmp_path / "run"), log_every=2),
    )
    real = RunLog.epoch_end

    def preempted_after_first_epoch(self, epoch, *a):
        real(self, epoch, *a)
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM or torchrun would; caught at the epoch's end

    monkeypatch.setattr(RunLog, "epoch_end", preempted_after_first_epoch)
    with pytest.raises(lifecycle.Preempted) as stopped:
        training.main(cfg, stage=2)
    assert stopped.value.exit_code == lifecycle.EXIT_PREEMPTED
    folder = tmp_path / "run" / "stage2"
    first = torch.load(folder / "last.pt", weights_only=True)
    assert first["epoch"] == 1 and first["momentum"]["seen"].sum() > 0
    monkeypatch.setattr(RunLog, "epoch_end", real)
    metrics = training.main(cfg, stage=2)
    last = torch.load(folder / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and 0 <= metrics["all"] <= 1 and metrics["num_images"] == 40
    assert json.loads((folder / "metrics.json").read_text())["all"] == pytest.approx(100 * metrics["all"])
    for state in (first, last):
        assert all(torch.isfinite(v).all() for v in state["adapter"].values())
    assert any(not torch.equal(first["adapter"][k], v) for k, v in last["adapter"].items())  # it trained on
    assert not torch.equal(first["momentum"]["m"], last["momentum"]["m"])  # M moved in the resumed epoch
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r.get("event") == "resumed"] == [2]
    assert all(np.isfinite(r["train_loss"]) for r in records if "train_loss" in r)
