"""`ecvl-fast eval`: a checkpoint (with its own config) or a zero-shot model on a converted split."""
from __future__ import annotations

from pathlib import Path

import torch

from ecvl_fast.method import losses
from ecvl_fast.run import checkpoint as ckpt_io
from ecvl_fast.run import dist as D
from ecvl_fast.run import precision
from ecvl_fast.config import Config, from_dict
from ecvl_fast.training.data import eval_loader, open_dataset
from ecvl_fast.evaluation.metrics import predict_split, shot_metrics
from ecvl_fast.evaluation.reports import write_report
from ecvl_fast.serving.classifier import load_classifier


def run_eval(cfg: Config, data: Path | None, ckpt: Path | None, split: str, out: Path | None, tau: float = 0.0) -> dict:
    """`tau`: post-hoc logit adjustment, tau * log(class prior) off the logits (Menon et al. 2021);
    choose it on the val split, then read the test split once."""
    state = None
    if ckpt is not None:
        state = ckpt_io.load(ckpt)
        cfg = from_dict(state["config"], f"{ckpt} config")
    if data is not None:
        cfg = from_dict({"data": {"path": str(data)}}, "--data", base=cfg)  # a derived run.out follows the data
    with D.session(cfg.run.device, cfg.dist.backend) as d:
        meta = open_dataset(cfg.data.path)
        if state is not None:
            ckpt_io.check(state, ckpt, model_name=cfg.model.name, num_classes=len(meta["classes"]))
        torch.manual_seed(cfg.run.seed)  # a model without weights to load is the same one every time
        net, text, adapter = load_classifier(cfg, state, meta["classes"], d.device)
        dt = precision.dtype(cfg.run.precision, d.device)
        posthoc = losses.log_prior(meta["train_counts"], tau, d.device)
        preds, labels = predict_split(net, eval_loader(cfg, d, split), text, d, adapter, dt, posthoc)
        metrics = shot_metrics(preds, labels, meta)
        if d.main:
            where = out or (ckpt.parent / f"eval-{split}" if ckpt else Path(cfg.run.out) / f"zero-shot-{split}")
            metrics = write_report(metrics, meta, where,
                                   f"{cfg.model.name} {'zero-shot' if ckpt is None else ckpt.name}, {split}",
                                   {"split": split, "stage": state["stage"] if state else 0, "run": where.name,
                                    "posthoc_tau": tau,
                                    "checkpoint": str(ckpt) if ckpt else f"{cfg.model.name} {cfg.model.pretrained}"})
        return metrics
