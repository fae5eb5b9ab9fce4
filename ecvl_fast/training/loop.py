"""The training loop (torchrun DDP or a single process) for both stages.

Stage 1 fine-tunes both CLIP encoders (eqs. 4-5) in instance-balanced order. Stage 2 freezes
them and trains the adapter (eq. 7) on class-balanced batches (eq. 12) of two views each, with
prompt cross-entropy plus L_DCVL (eq. 11); each sample's L_DCVL feeds the momentum bank (eq. 8),
whose normalised M (eq. 9) drives the next epoch's RandAugment (eq. 10).

Top to bottom: set-up -> resume (run/lifecycle.py) -> per epoch (train, validate, checkpoint) -> final
test report. Logging lives in run/logs.py; resuming, signals and the checkpoint cadence in run/lifecycle.py.
The step does autocast -> loss -> backward -> step with no host sync; the loss is read back
only every `run.log_every` steps (the sync points are marked).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ecvl_fast import EcvlError
from ecvl_fast.run import checkpoint as ckpt_io
from ecvl_fast.run import dist as D
from ecvl_fast.run import lifecycle
from ecvl_fast.method import losses
from ecvl_fast.run import precision
from ecvl_fast.config import (
    Config,
    check_together,
    reads_memory,
    reports_to,
    save_config,
    stage2_from_pretrained,
    trained_scale,
)
from ecvl_fast.training.data import eval_loader, open_dataset, steps_per_epoch, train_loader
from ecvl_fast.run.files import atomic_write
from ecvl_fast.evaluation.metrics import TOP, m_quantiles, predict_split, shot_metrics
from ecvl_fast.evaluation.reports import plot_curves, plot_m_by_group, read_metrics, write_report
from ecvl_fast.kernels.bank import MomentumBank, StaticMagnitudes, frequency_magnitudes
from ecvl_fast.run.logs import RunLog
from ecvl_fast.method import stage2 as two
from ecvl_fast.method.model import (
    ClipNet,
    Scorer,
    StageTwo,
    activation_line,
    build_clip,
    class_text_features,
    check_forward,
    check_name,
    prompt_tokens,
    quick_gelu_of,
    set_activation,
    trained_quick_gelu,
    tte_split,
    used_length,
    random_weights_warning,
)


@dataclass
class Run:
    cfg: Config
    d: D.Dist
    meta: dict
    net: ClipNet  # the raw module (checkpoints, eval)
    trainable: torch.nn.Module  # what the step trains and calls (CLIP, or StageTwo), compiled and/or DDP-wrapped
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    tokens: torch.Tensor  # [K, L] training prompts
    eval_tokens: torch.Tensor  # [T, K, L] eval prompts (all templates)
    out: Path
    stage: int = 1
    stage2: StageTwo | None = None  # stage 2: what trains (light module, adapter, cosine head), unwrapped
    light: str = "none"  # stage 2: the light module in the image tower, "auto" resolved
    text: torch.Tensor | None = None  # stage 2: frozen class text features [K, D]
    bank: MomentumBank | None = None  # stage 2: per-sample loss memory and M
    adjust: torch.Tensor | None = None  # stage 2: tau * log(class prior), stage2.logit_adjust
    best: float = -math.inf  # the best validation score (run.best_metric) so far
    best_epoch: int = 0  # the epoch best.pt holds
    amp: torch.dtype = torch.float32  # compute dtype (run.precision)
    health: list = field(default_factory=list)  # the mean loss between consecutive checkpoints (lifecycle.healthy)
    scaler: torch.amp.GradScaler | None = None  # fp16 only; a pass-through otherwise


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to 0."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return f


def build_run(cfg: Config, d: D.Dist, meta: dict, steps_per_epoch: int, stage: int = 1, out: Path | None = None) -> Run:
    """`steps_per_epoch` is the loader's length: train images // global batch (drop_last)."""
    check_together(cfg)  # a config built in code has not been through load_config
    torch.manual_seed(cfg.run.seed)
    sc = cfg.stage1 if stage == 1 else cfg.stage2
    clip, tokenizer = build_clip(cfg.model, load_weights=stage == 1 or stage2_from_pretrained(cfg), res=cfg.data.res)
    clip.logit_scale.requires_grad_(False)  # eq. 6's scale stays as loaded; BALLAD fixes 100 for CE
    net = ClipNet(clip).to(d.device)
    if d.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # training shapes are fixed (drop_last): tune once
    classes = meta["classes"]
    tokens = prompt_tokens(tokenizer, classes, "single")[0]
    net.text_len = used_length(tokens)  # on the host, once: the step's prompts are these or a subset
    run = Run(
        cfg,
        d,
        meta,
        net,
        net,
        None,
        None,
        stage=stage,
        out=run_folder(cfg, stage, out),
        tokens=tokens.to(d.device),
        eval_tokens=prompt_tokens(tokenizer, classes, cfg.model.templates).to(d.device),
    )
    if stage == 2:
        _init_stage2(run, meta)
    check_forward(net, run.tokens, cfg.data.res, cfg.model.name)
    if (
        stage == 1
        and cfg.data.batch_size // d.world_size < 2
        and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    ):
        raise EcvlError(
            f"data.batch_size = {cfg.data.batch_size} is {cfg.data.batch_size // d.world_size} image per "
            f"process: stage 1 trains {cfg.model.name}'s BatchNorm layers, which need at least 2; "
            f"raise data.batch_size"
        )
    trainable = run.stage2 if stage == 2 else net
    params = [p for p in trainable.parameters() if p.requires_grad]
    if stage == 2 and cfg.stage2.optimizer == "sgd":  # LIFT's: momentum 0.9
        run.opt = torch.optim.SGD(params, lr=sc.lr, momentum=0.9, weight_decay=sc.weight_decay)
    else:
        run.opt = torch.optim.AdamW(params, lr=sc.lr, weight_decay=sc.weight_decay)
    run.amp = precision.dtype(cfg.run.precision, d.device)
    run.scaler = precision.scaler(d.device, run.amp)
    warmup = max(1, int(sc.warmup_epochs * steps_per_epoch))
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lr_lambda(sc.epochs * steps_per_epoch, warmup))
    # compile before wrapping in DDP; a frozen stage-2 tower is compiled on its own (StageTwo), the
    # adapter and head around it stay eager (two small matrix products)
    outer = cfg.model.compile and not getattr(trainable, "compiled", False)
    model = torch.compile(trainable) if outer else trainable
    if d.enabled:
        # stage 2's buffers (the frozen towers' BN statistics, the text features) never change: no broadcast per step
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, broadcast_buffers=stage == 1)
    run.trainable = model
    return run


def _init_stage2(run: Run, meta: dict) -> None:
    """Frozen encoders (from the stage-1 checkpoint, or model.pretrained), fixed class text
    features, what trains (method/stage2.py), and the momentum bank (built before the loader,
    which is handed it)."""
    cfg = run.cfg
    if not stage2_from_pretrained(cfg):
        path = Path(cfg.stage2.init or Path(cfg.run.out) / "best.pt")
        state = ckpt_io.load(path, model_name=cfg.model.name, num_classes=len(meta["classes"]))
        run.net.load_state_dict(state["model"])
        set_activation(run.net, trained_quick_gelu(state, cfg.model.name))  # as stage 1 ran
    run.net.eval()
    run.text = class_text_features(run.net, run.eval_tokens)
    run.light = two.add_light_module(cfg, run.net, len(meta["classes"]))
    run.stage2 = two.modules(cfg, run.net, run.text).to(run.d.device)
    run.adjust = losses.log_prior(
        np.bincount(meta["train_labels"], minlength=len(meta["classes"])), cfg.stage2.logit_adjust, run.d.device
    )
    a = cfg.aug
    fixed = frequency_magnitudes(meta["train_labels"], a.m_direction) if a.m_source == "frequency" else None
    run.bank = MomentumBank(
        meta["train_labels"],
        beta=a.beta,
        device=run.d.device,
        norm=a.m_norm,
        scope=a.m_scope,
        direction=a.m_direction,
        fixed=fixed,
        lol=(a.lol_levels, a.lol_accept) if a.m_source == "lol" else None,
    )


def stage1_loss(
    run: Run, images: torch.Tensor, labels: torch.Tensor, cached=None, j: int = 0
) -> dict[str, torch.Tensor]:
    """eqs. 4-5 (or BALLAD's prompt CE). `cached`: every micro-batch's (image, text) features,
    computed without gradient; micro-batch `j`'s are replaced by this call's, so the loss sees the
    whole batch's negatives while the gradient flows through micro-batch `j` only."""
    cfg = run.cfg.stage1
    if cfg.loss == "prompt-ce":
        img, txt = run.trainable(images, run.tokens)
        terms = losses.prompt_ce_loss(img, txt, labels, cfg.ce_scale)
        return {"loss": terms["loss"], "ce": terms["ce"]}
    img, txt, _ = _features(run, images, labels)
    if cached is not None:
        img = torch.cat([c[0] for c in cached[:j]] + [img] + [c[0] for c in cached[j + 1 :]])
        txt = torch.cat([c[1] for c in cached[:j]] + [txt] + [c[1] for c in cached[j + 1 :]])
        labels = torch.cat([c[2] for c in cached])
    b, r = labels.shape[0], run.d.rank
    all_labels = D.gather_tensor(labels)
    return losses.clip_loss(
        D.gather_with_grad(img),
        D.gather_with_grad(txt),
        all_labels,
        run.net.logit_scale,
        rows=slice(r * b, (r + 1) * b) if run.d.enabled else None,
    )


def stage2_loss(run: Run, views: list[torch.Tensor], labels: torch.Tensor, idx: torch.Tensor):
    """Prompt CE on both views' adapted features, plus L_DCVL (eq. 11) over the global batch.

    Under DDP the adapted features are gathered (with gradient) so every sample has the 2B - 2
    negatives of the global batch, whatever the number of GPUs; each rank keeps its own rows'
    per-sample losses for the bank (summed over ranks at epoch end). With accumulation the frozen
    encoders (whose activations fill the GPU) run in `stage2.accum_steps` chunks; the adapter and
    the losses then see the whole batch at once, so every term, and M, is that of the unsplit batch.
    """
    cfg, b, r = run.cfg.stage2, labels.shape[0], run.d.rank
    adapted, weights = run.trainable(torch.cat(views))  # both views in one pass (the frozen tower: without a graph)
    all_labels = labels.repeat(len(views))
    scale = cfg.ce_scale if run.stage2.head is None else run.stage2.head.scale
    ce_terms = losses.prompt_ce_loss(adapted, weights, all_labels, scale, run.adjust)
    ce = ce_terms["loss"]
    if cfg.dcvl_weight == 0 and not reads_memory(run.cfg):  # BALLAD's row: no L_DCVL, and no reader of the bank
        return {"loss": ce, "ce": ce}
    source = run.cfg.aug.m_source
    if source == "ce":  # ECVL+: how well each sample is classified, mean of its views
        run.bank.record(idx, ce_terms["per_sample"].detach().view(len(views), b).mean(0))
    elif source == "lol":  # the share of its views classified right
        right = (ce_terms["logits"].detach().argmax(1) == all_labels).float()
        run.bank.record(idx, right.view(len(views), b).mean(0))
    if cfg.dcvl_weight == 0 and source != "dcvl":  # nothing reads L_DCVL
        return {"loss": ce, "ce": ce}
    rows = slice(r * b, (r + 1) * b) if run.d.enabled else None
    dcvl = losses.dcvl_loss(
        D.gather_with_grad(adapted[:b]), D.gather_with_grad(adapted[b : 2 * b]), cfg.temperature, rows=rows
    )
    if source == "dcvl":
        run.bank.record(idx, dcvl["per_sample"])  # eq. 8's input (also when its weight is 0); no host sync
    return {"loss": ce + cfg.dcvl_weight * dcvl["loss"], "ce": ce, "dcvl": dcvl["loss"]}


def train_step(run: Run, views, labels: torch.Tensor, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """autocast -> loss -> backward (scaled under fp16) -> step. Stage 1 with `accum_steps` > 1
    runs the batch as micro-batches and steps once (`_stage1_backward`)."""
    views = [views] if isinstance(views, torch.Tensor) else views
    run.opt.zero_grad(set_to_none=True)
    if run.stage == 1:
        terms = _stage1_backward(run, views[0], labels)
    else:
        with precision.autocast(run.d.device, run.amp):
            terms = stage2_loss(run, views, labels, idx)
        run.scaler.scale(terms["loss"]).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    return {k: v.detach() for k, v in terms.items()}


def _stage1_backward(run: Run, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the batch's loss, accumulated over `stage1.accum_steps` micro-batches.

    Prompt CE is a mean of per-sample terms: micro-batch j's mean, weighted by its share of the
    batch, sums to the batch's. The CLIP loss compares every sample with every other, so (as
    open_clip's --accum-freq) the features of all micro-batches are computed first without
    gradient, then each micro-batch is run again with gradient against the others' cached features.
    DDP synchronises gradients on the last micro-batch only.
    """
    a, n = run.cfg.stage1.accum_steps, labels.shape[0]
    xs, ys = images.chunk(a), labels.chunk(a)
    cached = None
    if a > 1 and run.cfg.stage1.loss == "clip":
        with torch.no_grad(), precision.autocast(run.d.device, run.amp):
            cached = [_features(run, x, y) for x, y in zip(xs, ys)]
    total: dict[str, torch.Tensor] = {}
    for j, (x, y) in enumerate(zip(xs, ys)):
        sync = j == len(xs) - 1 or not run.d.enabled
        with contextlib.nullcontext() if sync else run.trainable.no_sync(), precision.autocast(run.d.device, run.amp):
            terms = stage1_loss(run, x, y, cached, j)
            weight = 1.0 if cached is not None else y.shape[0] / n  # the cached form's loss is the whole batch's
            run.scaler.scale(terms["loss"] * weight).backward()
        for k, v in terms.items():
            total[k] = total.get(k, 0) + v.detach() * (1.0 / len(xs) if cached is not None else weight)
    return total


def _features(run: Run, images: torch.Tensor, labels: torch.Tensor):
    """(image features, per-sample text features, labels) for the CLIP loss: the text of each sample
    is its class prompt; encode the fewer of (batch, classes)."""
    few_labels = labels.shape[0] < run.tokens.shape[0]
    img, txt = run.trainable(images, run.tokens[labels] if few_labels else run.tokens)
    return img, (txt if few_labels else txt[labels]), labels


class EpochMeter:
    """An epoch's running figures, kept on the device so the step never syncs: the loss total,
    the first step whose loss was not finite (under fp16: the first of `window` overflowed steps
    in a row, as the scaler skips single ones), and the images seen. `carry` continues an epoch
    stopped mid-way, whatever the world size was then."""

    def __init__(self, run: Run, carry: dict):
        d, dev = run.d, run.d.device
        self.run, self.window, self.t0 = run, run.cfg.run.log_every, time.perf_counter()
        self.total = torch.full((), carry.get("loss_sum", 0.0) * d.world_size if d.main else 0.0, device=dev)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        self.streak = torch.zeros((), dtype=torch.int64, device=dev)
        self.images, self.timed = carry.get("images", 0), 0
        self.steps, self.mark = 0, (carry.get("loss_sum", 0.0), 0)  # the loss sum and steps at the last checkpoint

    def add(self, loss: torch.Tensor, batch: int, gstep: int) -> None:
        finite = torch.isfinite(loss)
        if self.run.amp == torch.float16:
            self.streak = torch.where(finite, torch.zeros_like(self.streak), self.streak + 1)
            finite = self.streak < self.window
        bad = ~finite & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, gstep), self.first_bad)
        self.total += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
        self.images += batch * self.run.d.world_size
        self.timed += batch * self.run.d.world_size
        self.steps += 1

    def check_finite(self) -> None:
        _check_finite(self.first_bad, self.run)  # sync point

    def img_s(self) -> float:
        return self.timed / (time.perf_counter() - self.t0)

    def carry(self) -> dict:
        """What a mid-epoch checkpoint carries: the loss summed over steps, averaged over ranks
        (so a resume with another world size logs the right mean), and the images seen."""
        d = self.run.d
        return {"loss_sum": float(D.all_reduce_sum(self.total.detach().clone())) / d.world_size, "images": self.images}

    def since_checkpoint(self) -> float | None:
        """The mean loss since the last checkpoint (or the epoch's start), over every rank: whether
        the training went on healthily from that checkpoint (`lifecycle.healthy`). A sync point."""
        total = self.carry()["loss_sum"]
        n = self.steps - self.mark[1]
        mean = (total - self.mark[0]) / n if n else None
        self.mark = (total, self.steps)
        return mean

    def train_loss(self, steps: int) -> float:
        return float(D.all_reduce_sum(self.total) / (steps * self.run.d.world_size))


def train_epoch(
    run: Run, loader, epoch: int, log, stop: lifecycle.StopSignal | None = None, pos: lifecycle.Position | None = None
) -> dict:
    """One epoch, from `pos.step` when a stopped run resumes in it. Every `run.log_every` steps
    (a sync point) the ranks check the loss, log, and agree on a stop signal; every
    `run.checkpoint_every` steps the main rank writes a checkpoint that resumes at that step."""
    run.trainable.train()
    run.net.train(run.stage == 1)  # stage 2: frozen encoders stay in eval mode (BN statistics)
    d, every, cadence, steps = run.d, run.cfg.run.log_every, run.cfg.run.checkpoint_every, len(loader)
    here = pos is not None and pos.epoch == epoch
    first = pos.step if here else 0
    meter = EpochMeter(run, (pos.carry or {}) if here else {})
    if first:
        loader.resume_at(epoch, first)
    progress = log.progress(loader, epoch, first, run.cfg.data.batch_size)
    for step, (views, labels, idx) in enumerate(progress, first):
        gstep = epoch * steps + step
        terms = train_step(run, views, labels.to(d.device, non_blocking=True), idx)
        meter.add(terms["loss"], labels.shape[0], gstep)
        last = step + 1 == steps
        if (step + 1) % every == 0 or last or progress.wants(step):  # every rank alike: a sync point
            meter.check_finite()
            record = {
                "epoch": epoch + 1,
                "step": gstep + 1,
                "loss": float(terms["loss"]),
                "lr": run.sched.get_last_lr()[0],
                "img_s": meter.img_s(),
            }
            log("step", record)
            progress.show(step, record["loss"], record["lr"], record["img_s"])
            if not last:
                _stop_if_signalled(run, stop, epoch, step + 1, meter)
        if cadence and not last and (gstep + 1) % cadence == 0:
            meter.check_finite()  # never save what followed a non-finite loss
            _save_mid_epoch(run, epoch, step + 1, meter)
    if run.bank is not None:
        _memory_epoch_end(run, log, epoch)
    return {"train_loss": meter.train_loss(steps), "img_s": meter.img_s(), "window": meter.since_checkpoint()}


def _stop_if_signalled(run: Run, stop, epoch: int, step: int, meter: EpochMeter) -> None:
    if stop is not None and stop.agreed(run.d):  # sync point: a signal reached some rank
        _save_mid_epoch(run, epoch, step, meter)
        raise lifecycle.Preempted(
            f"stopped by {stop.name} at epoch {epoch + 1}, step {step}; checkpoint "
            f"{run.out / 'last.pt'} written: run the same command to resume",
            stop.exit_code,
        )


def _memory_epoch_end(run: Run, log, epoch: int) -> None:
    """eqs. 8-9 in place, over every rank's sums: the next epoch's M (a sync point); M's quantiles
    per shot group to the log."""
    run.bank.end_epoch(D.all_reduce_sum)
    if run.d.main:
        log(
            "memory",
            {"epoch": epoch + 1, "m_by_group": m_quantiles(run.bank, run.meta["train_labels"], run.meta["groups"])},
        )


def _save_mid_epoch(run: Run, epoch: int, step: int, meter: EpochMeter) -> None:
    """A checkpoint that resumes at `step` of `epoch`: this epoch's running sums over every rank
    (the loss, the bank's per-sample sums) go with it. Every rank calls it (collectives)."""
    partial = run.bank.partial_state(D.all_reduce_sum) if run.bank is not None else None
    save_checkpoint(
        run, lifecycle.Position(epoch, step, run.best, meter.carry()), partial=partial, window=meter.since_checkpoint()
    )


def _check_finite(first_bad: torch.Tensor, run: Run) -> None:
    bad = first_bad.clone()
    if run.d.enabled:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if int(bad) >= 0:
        raise EcvlError(f"non-finite loss at step {int(bad) + 1}; training stopped ({_last_good(run)})")


def _last_good(run: Run) -> str:
    """Where a diverged run stands, and the ways out; marks the folder as diverged (main rank), so
    that the same command with a lower learning rate resumes its last finite checkpoint."""
    last, lr = run.out / "last.pt", f"stage{run.stage}.lr"
    if not last.exists():
        return f"no checkpoint written yet; lower {lr} and run again"
    if run.d.main:
        lifecycle.mark_diverged(run.out)
    return (
        f"run the same command with a lower {lr}: it resumes from the newest healthy checkpoint "
        f"({run.out / lifecycle.HEALTHY}), or starts over where there is none; --restart starts over"
    )


def _finite_weights(run: Run) -> bool:
    """Every trained weight is finite (one sync point per checkpoint). Weights are the same on
    every rank, so every rank reaches the same answer."""
    tensors = run.stage2.trained().values() if run.stage == 2 else run.net.state_dict().values()
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    bad = (~torch.stack(flags).all()).to(torch.int64).reshape(1) if flags else torch.zeros(1, dtype=torch.int64)
    return not bool(D.all_reduce_max(bad.to(run.d.device)))  # every rank agrees, or one would wait alone


def evaluate_split(run: Run, loader) -> dict:
    if run.stage == 2:
        model = two.scorer(run.cfg, run.stage2)
    else:
        model = Scorer(
            run.net,
            class_text_features(run.net, run.eval_tokens),
            scale=trained_scale(run.cfg, 1),
            views=tte_split(run.cfg.data.tte_crops, run.cfg.data.tte_views)[0],
        )
    preds, labels = predict_split(model, loader, run.d, run.amp, top=TOP)
    return shot_metrics(preds, labels, run.meta)


def save_checkpoint(
    run: Run, pos: lifecycle.Position, is_best: bool = False, partial: dict | None = None, window: float | None = None
) -> None:
    """last.pt (temp file, then rename), resuming at `pos`; best.pt a copy of it at epoch ends.
    A state with non-finite weights is never saved. `window`: the mean loss since the last
    checkpoint; where it is healthy, that checkpoint (the last.pt being replaced) becomes
    healthy.pt, what a diverged run resumes from: finite weights are not enough (a loss that
    explodes leaves finite, wrecked weights one step before the first NaN)."""
    if not _finite_weights(run):
        raise EcvlError(f"non-finite weights at epoch {pos.epoch + (pos.step != 0)}, not saved ({_last_good(run)})")
    healthy = window is not None and lifecycle.healthy(window, run.health)
    if window is not None:
        run.health = (run.health + [window])[-100:]
    if not run.d.main:
        return
    last = run.out / "last.pt"
    if healthy and last.is_file():
        atomic_write(run.out / lifecycle.HEALTHY, lambda tmp: shutil.copyfile(last, tmp))
    payload = {
        "model": run.net.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "epoch": pos.epoch,
        "stage": run.stage,
        "best": pos.best,
        "position": {"epoch": pos.epoch, "step": pos.step, "carry": pos.carry},
        "scaler": run.scaler.state_dict(),
        "rng": ckpt_io.rng_state(),
        "config": run.cfg.to_dict(),
        "model_name": run.cfg.model.name,
        "num_classes": len(run.meta["classes"]),
        "classes": run.meta["classes"],
        "quick_gelu": quick_gelu_of(run.net),
        "health": run.health,
        "best_epoch": run.best_epoch,
    }
    if run.stage == 2:
        payload |= {**two.state(run.stage2), "momentum": {**run.bank.state_dict(), **(partial or {})}}
    ckpt_io.save(run.out / "last.pt", payload)
    (run.out / lifecycle.DIVERGED).unlink(missing_ok=True)  # a finite state with these settings now stands
    if is_best:
        atomic_write(run.out / "best.pt", lambda tmp: shutil.copyfile(run.out / "last.pt", tmp))


def restore(run: Run, c: dict) -> None:
    """Everything `save_checkpoint` wrote, back into the run (the bank's partial sums: main rank)."""
    if c["stage"] != run.stage:
        raise EcvlError(f"{run.out / 'last.pt'}: a stage {c['stage']} checkpoint, resuming stage {run.stage}")
    run.net.load_state_dict(c["model"])
    set_activation(run.net, trained_quick_gelu(c, run.cfg.model.name))  # as the run being resumed ran
    run.health = list(c.get("health", []))
    run.best_epoch = c.get("best_epoch", 0)
    if run.stage == 2:
        two.load(run.stage2, c)
        run.bank.load_state_dict(c["momentum"], partial=run.d.main)
    run.opt.load_state_dict(c["optimizer"])
    run.sched.load_state_dict(c["scheduler"])
    _settings_into_optimizer(run)
    if c["scaler"]:  # empty unless fp16
        run.scaler.load_state_dict(c["scaler"])
    ckpt_io.set_rng_state(c["rng"])


def _settings_into_optimizer(run: Run) -> None:
    """The config's learning rate and weight decay over what the checkpoint's optimizer held: the
    same values on a plain resume, the lowered ones after a divergence (`lifecycle.RETUNABLE`)."""
    sc = run.cfg.stage1 if run.stage == 1 else run.cfg.stage2
    run.sched.base_lrs = [sc.lr] * len(run.opt.param_groups)
    for group, lam in zip(run.opt.param_groups, run.sched.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = sc.lr, sc.weight_decay
        group["lr"] = sc.lr * lam(run.sched.last_epoch)


def main(cfg: Config, stage: int = 1, out: Path | None = None, restart: bool = False) -> dict:
    """One stage end to end; returns the final test metrics (also in the run folder's metrics.json).
    Stage 2 writes under `out`, by default run.out/stage2/. A folder with a checkpoint continues
    where it stopped (run/lifecycle.py); `restart` starts over, keeping the old run aside."""
    if stage == 1 and cfg.stage1.epochs == 0:
        raise EcvlError("stage1.epochs = 0: there is no stage 1 to train (stage 2 starts from model.pretrained)")
    folder = run_folder(cfg, stage, out)
    with (
        D.session(cfg.run.device, cfg.dist.backend) as d,
        lifecycle.StopSignal(cfg.run.stop_grace_s) as stop,
        lifecycle.RunLock(folder, d),
        contextlib.ExitStack() as cleanup,
    ):
        return _train(cfg, d, stage, folder, restart, stop, cleanup)


def run_folder(cfg: Config, stage: int, out: Path | None = None) -> Path:
    """Where a stage writes: `out`, else run.out (stage 1) or run.out/stage2/."""
    return Path(out or Path(cfg.run.out) / ("stage2" if stage == 2 else ""))


def _train(cfg: Config, d: D.Dist, stage: int, folder: Path, restart: bool, stop, cleanup) -> dict:
    meta = open_dataset(cfg.data.path, d)
    check_trainable(cfg, meta)
    sc = cfg.stage1 if stage == 1 else cfg.stage2
    lifecycle.check_shared_folder(folder, d)
    log = RunLog(
        folder,
        d.main,
        sc.epochs,
        stage,
        reports_to(cfg),
        lines_per_epoch=cfg.run.lines_per_epoch,
        name=run_name(cfg, folder),
        config=cfg.to_dict(),
    )
    check_name(cfg.model.name)  # before any word about its weights
    if d.main:
        print(f"stage {stage}: run folder {folder}", flush=True)
        if stage == 1 or stage2_from_pretrained(cfg):
            print(f"model {cfg.model.name} at {cfg.data.res} px, {activation_line(cfg.model)}", flush=True)
        warning = random_weights_warning(cfg.model) if stage == 1 or stage2_from_pretrained(cfg) else None
        if warning:
            print(warning, file=sys.stderr, flush=True)
    pos, ckpt = lifecycle.start(folder, cfg, sc.epochs, d, restart, log, stage)
    if pos.finished is not None:
        if d.main:
            print(
                f"{folder}: finished already ({sc.epochs} epochs); its metrics.json stands (--restart to train again)"
            )
        return read_metrics(pos.finished)
    log.open_trackers()
    cleanup.callback(log.close)  # also when the run stops on an error or a signal
    run = build_run(cfg, d, meta, steps_per_epoch(cfg, len(meta["train_labels"])), stage, folder)
    if stage == 2 and d.main:
        s = cfg.stage2
        parts = (
            [f"{run.light} in the image tower"] * (s.peft != "none")
            + ["adapter"] * s.adapter
            + ["cosine head"] * (s.head == "cosine")
        )
        print(
            f"stage 2 trains {sum(p.numel() for p in run.stage2.trained().values()):,} parameters ({', '.join(parts)})",
            flush=True,
        )
    if stage == 1:
        loader = train_loader(cfg, d, meta, "random")
    else:  # the loader is handed the bank and reads its M each epoch (eq. 10); + momentum row: not
        order = "random" if cfg.stage2.sampling == "instance" else "balanced"
        loader = train_loader(cfg, d, meta, order, views=cfg.stage2.views, memory=_memory(cfg, run.bank), stage=2)
    if d.main:
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write(run.out / "config.toml", lambda tmp: save_config(cfg, tmp))
    if ckpt is not None:
        restore(run, ckpt)
    run.best = pos.best
    loader.epoch = pos.epoch
    val = eval_loader(cfg, d, "val") if "val" in meta["images"] else None
    if val is None and d.main and pos.epoch < sc.epochs:
        print(
            f"no val split in {cfg.data.path}: best.pt is the last epoch's (convert with --val-per-class N for one)",
            flush=True,
        )
    for epoch in range(pos.epoch, sc.epochs):
        stats = train_epoch(run, loader, epoch, log, stop, pos)
        scores = evaluate_split(run, val) if val is not None else None
        score = best_score(cfg, scores, epoch)
        log.epoch_end(epoch, stats, run.sched.get_last_lr()[0], scores, len(loader), cfg.data.batch_size)
        if score > run.best:
            run.best_epoch = epoch + 1
        save_checkpoint(
            run, lifecycle.Position(epoch + 1, 0, max(run.best, score)), score > run.best, window=stats["window"]
        )
        run.best = max(run.best, score)
        if epoch + 1 < sc.epochs and stop.agreed(d):  # sync point, once per epoch
            raise lifecycle.Preempted(
                f"stopped by {stop.name} after epoch {epoch + 1}; checkpoint "
                f"{run.out / 'last.pt'} written: run the same command to resume",
                stop.exit_code,
            )
    reported = _reported_checkpoint(run, val is not None)
    metrics = evaluate_split(run, eval_loader(cfg, d, cfg.data.eval_split))
    if d.main:
        warn_if_collapsed(metrics, len(meta["classes"]), cfg.data.eval_split)
        title = f"{run_name(cfg, run.out)}: {cfg.model.name} stage {stage}"
        which = f"{reported.name}, epoch {run.best_epoch if reported.name == 'best.pt' else sc.epochs}"
        metrics = write_report(
            metrics,
            meta,
            run.out,
            f"{title}, {cfg.data.eval_split} split ({which})",
            {
                "split": cfg.data.eval_split,
                "stage": stage,
                "run": run_name(cfg, run.out),
                "checkpoint": str(reported),
                "report": cfg.run.report,
                "epochs": sc.epochs,
                "best_metric": cfg.run.best_metric if val is not None else None,
                "best_epoch": run.best_epoch if val is not None else sc.epochs,
                "trial": bool(cfg.run.limit_steps or cfg.run.limit_eval),
            },
        )
        plot_curves(run.out / "log.jsonl", run.out / "curves.png", title)
        if run.bank is not None:
            plot_m_by_group(run.out / "log.jsonl", run.out / "m_by_group.png", title)
        print(f"stage {stage} done: {run.out} (metrics.json, best.pt, last.pt)", flush=True)
    log.close()
    if stop.agreed(d):  # sync point: a signal during the final evaluation stops what would come next
        raise lifecycle.Preempted(
            f"stopped by {stop.name} after stage {stage} finished ({run.out}): run the same command to continue",
            stop.exit_code,
        )
    return metrics


def run_name(cfg: Config, folder: Path) -> str:
    """What plots and trackers call a run: its folder's name; the run's own for its stage2/ folder."""
    return Path(cfg.run.out).name if folder.name == "stage2" else folder.name


def best_score(cfg: Config, scores: dict | None, epoch: int) -> float:
    """What picks best.pt: the val split's run.best_metric (all where the split leaves its shot
    group empty); without a val split the epoch, so best.pt is the last epoch's."""
    if scores is None:
        return float(epoch)
    value = scores.get(cfg.run.best_metric)
    return scores["all"] if value is None else value


def _reported_checkpoint(run: Run, has_val: bool) -> Path:
    """The checkpoint the final report evaluates (run.report), its weights loaded into the run:
    last.pt (the weights in hand), or best.pt on val."""
    if run.cfg.run.report == "last" or not has_val:
        return run.out / "last.pt"
    c = ckpt_io.load(run.out / "best.pt")
    run.best_epoch = c["epoch"]  # what the file holds (after a resume from an earlier checkpoint, too)
    run.net.load_state_dict(c["model"])
    if run.stage == 2:
        two.load(run.stage2, c)
    return run.out / "best.pt"


def warn_if_collapsed(metrics: dict, k: int, split: str) -> None:
    """A model whose predictions fall on one or two classes learned nothing useful (a learning rate
    far too high, too few epochs, random weights): say so rather than report its accuracy quietly."""
    used = metrics["predicted_classes"]
    if used <= 2 < k:
        print(
            f"warning: every {split} prediction falls on {used} of {k} classes: the model has collapsed "
            "(a learning rate far too high, too few epochs, or an encoder trained from random weights)",
            file=sys.stderr,
        )


def check_trainable(cfg: Config, meta: dict) -> None:
    """Refuse, before any work, data on which a run would train nothing."""
    n, k = meta["images"]["train"], len(meta["classes"])
    if k < 2:
        raise EcvlError(f"{cfg.data.path}: {k} class; a classifier needs at least two")
    group = cfg.run.best_metric
    if "val" in meta["images"] and group in meta["groups"] and not meta["groups"][group]:
        raise EcvlError(
            f"run.best_metric = {group!r}: {cfg.data.path} has no {group}-shot classes to choose best.pt "
            f"by; choose all, macro_f1 or a shot group it has"
        )
    if n < cfg.data.batch_size:  # every epoch drops its last, partial batch: no step at all
        raise EcvlError(
            f"{cfg.data.path}: {n} train images, fewer than one batch (data.batch_size = "
            f"{cfg.data.batch_size}): nothing would train; lower data.batch_size"
        )


def _memory(cfg: Config, bank: MomentumBank):
    """What stage 2's RandAugment and memory-driven crop read M from: the bank (eq. 9), a fixed M
    (RandAugment only), or nothing (neither on)."""
    if not reads_memory(cfg):
        return None
    if cfg.stage2.randaug_m < 0:
        return bank
    return StaticMagnitudes(np.full(len(bank), cfg.stage2.randaug_m))  # plain RandAugment at this M
