"""The training loop (torchrun DDP or a single process) for both stages.

Stage 1 fine-tunes both CLIP encoders (eqs. 4-5) in instance-balanced order. Stage 2 freezes
them and trains the adapter (eq. 7) on class-balanced batches (eq. 12) of two views each, with
prompt cross-entropy plus L_DCVL (eq. 11); each sample's L_DCVL feeds the momentum bank (eq. 8),
whose normalised M (eq. 9) drives the next epoch's RandAugment (eq. 10).

Top to bottom: set-up -> resume -> per epoch (train, validate, checkpoint) -> final test report.
The step does autocast -> loss -> backward -> step with no host sync; the loss is read back
only every `run.log_every` steps (the sync points are marked).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ecvl_fast import EcvlError
from ecvl_fast import checkpoint as ckpt_io
from ecvl_fast import dist as D
from ecvl_fast import losses
from ecvl_fast.config import Config, save_config
from ecvl_fast.data import eval_loader, open_dataset, train_loader
from ecvl_fast.evaluate import m_quantiles, plot_m_by_group, predict, shot_metrics, write_report
from ecvl_fast.kernels.bank import MomentumBank, StaticMagnitudes
from ecvl_fast.model import Adapter, ClipNet, adapted_features, build_clip, class_text_features, prompt_tokens


@dataclass
class Run:
    cfg: Config
    d: D.Dist
    meta: dict
    net: ClipNet  # the raw module (checkpoints, eval)
    model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    tokens: torch.Tensor  # [K, L] training prompts
    eval_tokens: torch.Tensor  # [T, K, L] eval prompts (all templates)
    out: Path
    stage: int = 1
    adapter: Adapter | None = None  # stage 2: the only trainable module
    text: torch.Tensor | None = None  # stage 2: frozen class text features [K, D]
    bank: MomentumBank | None = None  # stage 2: per-sample loss memory and M


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to 0."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return f


def build_run(cfg: Config, d: D.Dist, meta: dict, steps_per_epoch: int, stage: int = 1,
              out: Path | None = None) -> Run:
    """`steps_per_epoch` is the loader's length: train images // global batch (drop_last)."""
    torch.manual_seed(cfg.run.seed)
    sc = cfg.stage1 if stage == 1 else cfg.stage2
    clip, tokenizer = build_clip(cfg.model, load_weights=stage == 1 or cfg.stage2.init == "none")
    clip.logit_scale.requires_grad_(False)  # eq. 6's scale stays as loaded; BALLAD fixes 100 for CE
    net = ClipNet(clip).to(d.device)
    if d.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    classes = meta["classes"]
    run = Run(cfg, d, meta, net, net, None, None, stage=stage, out=Path(out or Path(cfg.run.out) / ("stage2" if stage == 2 else "")),
              tokens=prompt_tokens(tokenizer, classes, "single")[0].to(d.device),
              eval_tokens=prompt_tokens(tokenizer, classes, cfg.model.templates).to(d.device))
    if stage == 2:
        _init_stage2(run, meta)
    trainable = run.adapter if stage == 2 else net
    run.opt = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=sc.lr,
                                weight_decay=sc.weight_decay)
    warmup = max(1, int(sc.warmup_epochs * steps_per_epoch))
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lr_lambda(sc.epochs * steps_per_epoch, warmup))
    model = torch.compile(trainable) if cfg.model.compile else trainable  # compile before wrapping in DDP
    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    run.model = model
    return run


def _init_stage2(run: Run, meta: dict) -> None:
    """Frozen encoders (from the stage-1 checkpoint), fixed class text features, a fresh adapter,
    and the momentum bank (built before the loader, which is handed it)."""
    cfg = run.cfg
    if cfg.stage2.init != "none":
        path = Path(cfg.stage2.init or Path(cfg.run.out) / "best.pt")
        run.net.load_state_dict(ckpt_io.load(path, model_name=cfg.model.name, num_classes=len(meta["classes"]))["model"])
    run.net.requires_grad_(False).eval()
    run.text = class_text_features(run.net, run.eval_tokens)
    run.adapter = Adapter(run.text.shape[1], cfg.stage2.ratio).to(run.d.device)
    run.bank = MomentumBank(meta["train_labels"], beta=cfg.aug.beta, device=run.d.device, norm=cfg.aug.m_norm)


def stage1_loss(run: Run, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    cfg, k = run.cfg.stage1, run.tokens.shape[0]
    if cfg.loss == "prompt-ce":
        img, txt = run.model(images, run.tokens)
        return losses.prompt_ce_loss(img.float(), txt.float(), labels, cfg.ce_scale)
    # clip: the text of each sample is its class prompt; encode the fewer of (batch, classes).
    few_labels = labels.shape[0] < k
    img, txt = run.model(images, run.tokens[labels] if few_labels else run.tokens)
    txt = txt if few_labels else txt[labels]
    b, r = labels.shape[0], run.d.rank
    all_labels = D.gather_tensor(labels)
    return losses.clip_loss(D.gather_with_grad(img.float()), D.gather_with_grad(txt.float()), all_labels,
                            run.net.logit_scale, rows=slice(r * b, (r + 1) * b) if run.d.enabled else None)


def stage2_loss(run: Run, views: list[torch.Tensor], labels: torch.Tensor, idx: torch.Tensor):
    """Prompt CE on both views' adapted features, plus L_DCVL (eq. 11) over the global batch.

    Under DDP the adapted features are gathered (with gradient) so every sample has the 2B - 2
    negatives of the global batch, whatever the number of GPUs; each rank keeps its own rows'
    per-sample losses for the bank (summed over ranks at epoch end).
    """
    cfg, b, r = run.cfg.stage2, labels.shape[0], run.d.rank
    with torch.no_grad():
        feats, _ = run.net(torch.cat(views))  # frozen encoders: both views in one pass
    adapted = adapted_features(feats, run.model)
    ce = losses.prompt_ce_loss(adapted, run.text, labels.repeat(len(views)), cfg.ce_scale)["loss"]
    if cfg.dcvl_weight == 0 and not cfg.randaug:  # BALLAD's row: no L_DCVL, and no reader of the bank
        return {"loss": ce, "ce": ce}
    rows = slice(r * b, (r + 1) * b) if run.d.enabled else None
    dcvl = losses.dcvl_loss(D.gather_with_grad(adapted[:b]), D.gather_with_grad(adapted[b:2 * b]),
                            cfg.temperature, rows=rows)
    run.bank.record(idx, dcvl["per_sample"])  # eq. 8's input (also when its weight is 0); no host sync
    return {"loss": ce + cfg.dcvl_weight * dcvl["loss"], "ce": ce, "dcvl": dcvl["loss"]}


def train_step(run: Run, views, labels: torch.Tensor, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    views = [views] if isinstance(views, torch.Tensor) else views
    with torch.autocast(run.d.device.type, dtype=torch.bfloat16, enabled=run.d.device.type == "cuda"):
        terms = stage1_loss(run, views[0], labels) if run.stage == 1 else stage2_loss(run, views, labels, idx)
    run.opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    run.opt.step()
    run.sched.step()
    return {k: v.detach() for k, v in terms.items()}


def train_epoch(run: Run, loader, epoch: int, log) -> dict:
    run.model.train()
    run.net.train(run.stage == 1)  # stage 2: frozen encoders stay in eval mode (BN statistics)
    d, every = run.d, run.cfg.run.log_every
    total = torch.zeros((), device=d.device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=d.device)
    t0, n, steps = time.perf_counter(), 0, len(loader)
    for step, (views, labels, idx) in enumerate(_progress(loader, d, f"epoch {epoch + 1}")):
        gstep = epoch * steps + step
        terms = train_step(run, views, labels.to(d.device, non_blocking=True), idx)
        bad = ~torch.isfinite(terms["loss"]) & (first_bad < 0)
        first_bad = torch.where(bad, torch.full_like(first_bad, gstep), first_bad)
        total += torch.nan_to_num(terms["loss"], nan=0.0, posinf=0.0, neginf=0.0)
        n += labels.shape[0] * d.world_size
        if (step + 1) % every == 0 or step + 1 == steps:
            _check_finite(first_bad, run)  # sync point: once per log_every steps
            log({"epoch": epoch + 1, "step": gstep + 1, "loss": float(terms["loss"]),
                 "lr": run.sched.get_last_lr()[0], "img_s": n / (time.perf_counter() - t0)})
    if run.bank is not None:
        run.bank.end_epoch(D.all_reduce_sum)  # eqs. 8-9 in place: next epoch's M; a sync point
        if d.main:
            log({"epoch": epoch + 1, "m_by_group": m_quantiles(run.bank, run.meta["train_labels"], run.meta["groups"])})
    return {"train_loss": float(D.all_reduce_sum(total) / (steps * d.world_size)),
            "img_s": n / (time.perf_counter() - t0)}


def _check_finite(first_bad: torch.Tensor, run: Run) -> None:
    bad = first_bad.clone()
    if run.d.enabled:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if int(bad) >= 0:
        last = run.out / "last.pt"
        kept = f"last good checkpoint {last} left intact" if last.exists() else "no checkpoint written yet"
        raise EcvlError(f"non-finite loss at step {int(bad) + 1}; training stopped ({kept})")


def _progress(loader, d: D.Dist, desc: str):
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, disable=not d.main, dynamic_ncols=True)


def evaluate_split(run: Run, loader) -> dict:
    text = run.text if run.text is not None else class_text_features(run.net, run.eval_tokens)
    preds, labels = predict(run.net, loader, text, run.d, run.adapter)
    return shot_metrics(preds, labels, run.meta)


def save_checkpoint(run: Run, epoch: int, best: float, is_best: bool) -> None:
    if not run.d.main:
        return
    payload = {"model": run.net.state_dict(), "optimizer": run.opt.state_dict(),
               "scheduler": run.sched.state_dict(), "epoch": epoch, "stage": run.stage, "best": best,
               "rng": ckpt_io.rng_state(), "config": run.cfg.to_dict(), "model_name": run.cfg.model.name,
               "num_classes": len(run.meta["classes"]), "classes": run.meta["classes"]}
    if run.stage == 2:
        payload |= {"adapter": run.adapter.state_dict(), "momentum": run.bank.state_dict()}
    ckpt_io.save(run.out / "last.pt", payload)
    if is_best:
        tmp = run.out / ".best.pt.tmp"
        shutil.copyfile(run.out / "last.pt", tmp)
        tmp.replace(run.out / "best.pt")


def resume(run: Run) -> tuple[int, float]:
    c = ckpt_io.load(run.out / "last.pt", model_name=run.cfg.model.name, num_classes=len(run.meta["classes"]))
    if c["stage"] != run.stage:
        raise EcvlError(f"{run.out / 'last.pt'}: a stage {c['stage']} checkpoint, resuming stage {run.stage}")
    run.net.load_state_dict(c["model"])
    if run.stage == 2:
        run.adapter.load_state_dict(c["adapter"])
        run.bank.load_state_dict(c["momentum"])
    run.opt.load_state_dict(c["optimizer"])
    run.sched.load_state_dict(c["scheduler"])
    ckpt_io.set_rng_state(c["rng"])
    return c["epoch"], c["best"]


def main(cfg: Config, resume_run: bool = False, stage: int = 1, out: Path | None = None) -> dict:
    """One stage end to end; returns the final test metrics (also in the run folder's metrics.json).
    Stage 2 writes under `out`, by default run.out/stage2/."""
    with D.session(cfg.run.device, cfg.dist.backend) as d:
        return _train(cfg, d, resume_run, stage, out)


def _train(cfg: Config, d: D.Dist, resume_run: bool, stage: int, out: Path | None) -> dict:
    meta = open_dataset(cfg.data.path)
    run = build_run(cfg, d, meta, len(meta["train_labels"]) // cfg.data.batch_size, stage, out)
    if stage == 1:
        loader = train_loader(cfg, d, meta, "random")
    else:  # the loader is handed the bank and reads its M each epoch (eq. 10); + momentum row: not
        loader = train_loader(cfg, d, meta, "balanced", views=2, magnitudes=_magnitudes(cfg, run.bank))
    if d.main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.out / "config.toml")
        if not resume_run:
            (run.out / "log.jsonl").unlink(missing_ok=True)
    start, best = resume(run) if resume_run else (0, -math.inf)
    loader.epoch = start
    val = eval_loader(cfg, d, "val") if "val" in meta["images"] else None
    log = _logger(run)
    for epoch in range(start, (cfg.stage1 if stage == 1 else cfg.stage2).epochs):
        stats = train_epoch(run, loader, epoch, log)
        score = evaluate_split(run, val)["all"] if val is not None else float(epoch)  # train-last without val
        log({"epoch": epoch + 1, **stats, "val_all": score if val is not None else None})
        save_checkpoint(run, epoch + 1, max(best, score), score > best)
        best = max(best, score)
    metrics = evaluate_split(run, eval_loader(cfg, d, cfg.data.eval_split))
    if d.main:
        write_report(metrics, meta, run.out, f"{cfg.model.name} stage {stage}, {cfg.data.eval_split} split")
        if run.bank is not None:
            plot_m_by_group(run.out / "log.jsonl", run.out / "m_by_group.png")
    return metrics


def _magnitudes(cfg: Config, bank: MomentumBank):
    if not cfg.stage2.randaug:
        return None
    if cfg.stage2.randaug_m < 0:
        return bank
    if cfg.stage2.randaug_m > 1:
        raise EcvlError(f"stage2.randaug_m={cfg.stage2.randaug_m}: a fixed M lies in [0, 1] (< 0: the memory)")
    return StaticMagnitudes(np.full(len(bank), cfg.stage2.randaug_m))  # plain RandAugment at this M


def _logger(run: Run):
    path = run.out / "log.jsonl"

    def log(record: dict) -> None:
        if run.d.main:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
    return log
