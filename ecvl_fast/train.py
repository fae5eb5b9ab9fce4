"""The training loop (torchrun DDP or a single process). Stage 1: fine-tune both CLIP encoders.

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

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ecvl_fast import EcvlError
from ecvl_fast import checkpoint as ckpt_io
from ecvl_fast import dist as D
from ecvl_fast import losses
from ecvl_fast.config import Config, save_config
from ecvl_fast.data import eval_loader, open_dataset, train_loader
from ecvl_fast.evaluate import predict, shot_metrics, write_report
from ecvl_fast.model import ClipNet, build_clip, class_text_features, prompt_tokens


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


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to 0."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return f


def build_run(cfg: Config, d: D.Dist, meta: dict, steps_per_epoch: int) -> Run:
    torch.manual_seed(cfg.run.seed)
    clip, tokenizer = build_clip(cfg.model)
    clip.logit_scale.requires_grad_(False)  # eq. 6's scale stays as loaded; BALLAD fixes 100 for CE
    net = ClipNet(clip).to(d.device)
    if d.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    classes = meta["classes"]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.stage1.lr, weight_decay=cfg.stage1.weight_decay)
    total = cfg.stage1.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, max(1, int(cfg.stage1.warmup_epochs * steps_per_epoch))))
    model = torch.compile(net) if cfg.model.compile else net  # compile before wrapping in DDP
    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return Run(cfg, d, meta, net, model, opt, sched,
               tokens=prompt_tokens(tokenizer, classes, "single")[0].to(d.device),
               eval_tokens=prompt_tokens(tokenizer, classes, cfg.model.templates).to(d.device),
               out=Path(cfg.run.out))


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


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.autocast(run.d.device.type, dtype=torch.bfloat16, enabled=run.d.device.type == "cuda"):
        terms = stage1_loss(run, images, labels)
    run.opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    run.opt.step()
    run.sched.step()
    return {k: v.detach() for k, v in terms.items()}


def train_epoch(run: Run, loader, epoch: int, log) -> dict:
    run.model.train()
    d, every = run.d, run.cfg.run.log_every
    total = torch.zeros((), device=d.device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=d.device)
    t0, n, steps = time.perf_counter(), 0, len(loader)
    for step, (views, labels, _) in enumerate(_progress(loader, d, f"epoch {epoch + 1}")):
        gstep = epoch * steps + step
        terms = train_step(run, views[0], labels.to(d.device, non_blocking=True))
        bad = ~torch.isfinite(terms["loss"]) & (first_bad < 0)
        first_bad = torch.where(bad, torch.full_like(first_bad, gstep), first_bad)
        total += torch.nan_to_num(terms["loss"], nan=0.0, posinf=0.0, neginf=0.0)
        n += labels.shape[0] * d.world_size
        if (step + 1) % every == 0 or step + 1 == steps:
            _check_finite(first_bad, run)  # sync point: once per log_every steps
            log({"epoch": epoch + 1, "step": gstep + 1, "loss": float(terms["loss"]),
                 "lr": run.sched.get_last_lr()[0], "img_s": n / (time.perf_counter() - t0)})
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
    text = class_text_features(run.net, run.eval_tokens)
    preds, labels = predict(run.net, loader, text, run.d)
    return shot_metrics(preds, labels, run.meta)


def save_checkpoint(run: Run, epoch: int, best: float, is_best: bool) -> None:
    if not run.d.main:
        return
    payload = {"model": run.net.state_dict(), "optimizer": run.opt.state_dict(),
               "scheduler": run.sched.state_dict(), "epoch": epoch, "stage": 1, "best": best,
               "rng": ckpt_io.rng_state(), "config": run.cfg.to_dict(), "model_name": run.cfg.model.name,
               "num_classes": len(run.meta["classes"]), "classes": run.meta["classes"]}
    ckpt_io.save(run.out / "last.pt", payload)
    if is_best:
        tmp = run.out / ".best.pt.tmp"
        shutil.copyfile(run.out / "last.pt", tmp)
        tmp.replace(run.out / "best.pt")


def resume(run: Run) -> tuple[int, float]:
    c = ckpt_io.load(run.out / "last.pt", model_name=run.cfg.model.name, num_classes=len(run.meta["classes"]))
    run.net.load_state_dict(c["model"])
    run.opt.load_state_dict(c["optimizer"])
    run.sched.load_state_dict(c["scheduler"])
    ckpt_io.set_rng_state(c["rng"])
    return c["epoch"], c["best"]


def main(cfg: Config, resume_run: bool = False) -> dict:
    """Stage 1 end to end; returns the final test metrics (also in run.out/metrics.json)."""
    d = D.setup(cfg.run.device, cfg.dist.backend)
    try:
        return _train(cfg, d, resume_run)
    finally:
        D.teardown()


def _train(cfg: Config, d: D.Dist, resume_run: bool) -> dict:
    meta = open_dataset(cfg.data.path)
    loader = train_loader(cfg, d, meta, "random", randaug=cfg.aug.randaug)
    run = build_run(cfg, d, meta, len(loader))
    if d.main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.out / "config.toml")
    start, best = resume(run) if resume_run else (0, -math.inf)
    loader.epoch = start
    val = eval_loader(cfg, d, "val") if "val" in meta["images"] else None
    log = _logger(run)
    for epoch in range(start, cfg.stage1.epochs):
        stats = train_epoch(run, loader, epoch, log)
        score = evaluate_split(run, val)["all"] if val is not None else float(epoch)  # train-last without val
        log({"epoch": epoch + 1, **stats, "val_all": score if val is not None else None})
        save_checkpoint(run, epoch + 1, max(best, score), score > best)
        best = max(best, score)
    metrics = evaluate_split(run, eval_loader(cfg, d, cfg.data.eval_split))
    if d.main:
        write_report(metrics, meta, run.out, f"{cfg.model.name} stage 1, {cfg.data.eval_split} split")
    return metrics


def _logger(run: Run):
    path = run.out / "log.jsonl"

    def log(record: dict) -> None:
        if run.d.main:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
    return log
