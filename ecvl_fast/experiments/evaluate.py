"""`ecvl-fast eval`: a checkpoint (with its own config) or a zero-shot model on a converted split,
with test-time ensembling and post-hoc logit adjustment (tau given, or chosen on the val split)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ecvl_fast import EcvlError
from ecvl_fast.method import losses
from ecvl_fast.run import checkpoint as ckpt_io
from ecvl_fast.run import dist as D
from ecvl_fast.run import precision
from ecvl_fast.config import Config, from_dict
from ecvl_fast.training.data import eval_loader, open_dataset
from ecvl_fast.evaluation.metrics import ranked, shot_metrics, split_logits
from ecvl_fast.evaluation.reports import write_report
from ecvl_fast.serving.classifier import load_scorer

TAUS = tuple(float(t) for t in np.arange(0, 2.01, 0.25))  # the grid `--tau auto` searches (LIFT's tau is 1)


def adjusted(logits: np.ndarray, train_counts, tau: float) -> np.ndarray:
    """Post-hoc logit adjustment: tau * log(class prior) off the logits (Menon et al., ICLR 2021)."""
    prior = losses.log_prior(train_counts, tau)
    return logits if prior is None else logits - prior.numpy()


def choose_tau(logits: np.ndarray, labels: np.ndarray, train_counts) -> tuple[float, dict]:
    """The tau of TAUS with the best mean per-class accuracy on these (val) logits, the smaller on
    a tie; and every tau's score."""
    classes = np.unique(labels)
    scores = {}
    for tau in TAUS:
        right = adjusted(logits, train_counts, tau).argmax(1) == labels
        scores[tau] = float(np.mean([right[labels == c].mean() for c in classes]))
    return max(TAUS, key=lambda t: (scores[t], -t)), scores


def _check_report_folder(where: Path, out: Path | None, ckpt: Path | None) -> None:
    """Before the work: a run folder a running `train` holds is its alone, and the report's folder
    must be writable. Either way, --out names another."""
    import os

    from ecvl_fast.run.files import writable
    from ecvl_fast.run.lifecycle import held_by

    if os.environ.get("RANK", "0") != "0":  # under torchrun, before the process group: the main rank checks
        return
    if out is None and ckpt is not None and (holder := held_by(ckpt.parent)):
        raise EcvlError(
            f"{ckpt.parent} is being written by a running train ({holder}): pass --out DIR for this evaluation's report"
        )
    reason = writable(where)
    if reason:
        raise EcvlError(f"{where}: the report cannot be written there ({reason}); pass --out DIR")


def run_eval(
    cfg: Config,
    data: Path | None,
    ckpt: Path | None,
    split: str,
    out: Path | None,
    tau: float | str = 0.0,
    views: int | None = None,
) -> dict:
    """`tau`: post-hoc logit adjustment, a number, or "auto": chosen on the val split first (then
    `split` is read once). `views`: test-time views (default: the config's data.tte_views)."""
    state = None
    if ckpt is not None:
        state = ckpt_io.load(ckpt)
        cfg = from_dict(state["config"], f"{ckpt} config")
    if data is not None:
        cfg = from_dict({"data": {"path": str(data)}}, "--data", base=cfg)  # a derived run.out follows the data
    where = out or (ckpt.parent / f"eval-{split}" if ckpt else Path(cfg.run.out) / f"zero-shot-{split}")
    _check_report_folder(where, out, ckpt)
    with D.session(cfg.run.device, cfg.dist.backend) as d:
        meta = open_dataset(cfg.data.path, d)
        if state is not None:
            ckpt_io.check(state, ckpt, model_name=cfg.model.name, num_classes=len(meta["classes"]))
            ckpt_io.check_classes(state, ckpt, meta["classes"], cfg.data.path)
        if tau == "auto" and "val" not in meta["images"]:
            raise EcvlError(
                f"--tau auto chooses tau on the val split, and {cfg.data.path} has none "
                "(convert with --val-per-class N)"
            )
        trained = cfg.stage2.logit_adjust if state is not None and state.get("stage") == 2 else 0.0
        if trained and tau != "auto" and tau > 0 and d.main:
            print(
                f"note: this model was trained with the logit-adjusted loss (tau {trained:g}); --tau {tau:g} "
                "adjusts its logits a second time ('--tau auto' lets the val split decide, 0 included)"
            )
        torch.manual_seed(cfg.run.seed)  # a model without weights to load is the same one every time
        scorer = load_scorer(cfg, state, meta["classes"], d.device, views)
        dt = precision.dtype(cfg.run.precision, d.device)
        context = {}
        if tau == "auto":
            tau, scores = choose_tau(
                *split_logits(scorer, eval_loader(cfg, d, "val", views), d, dt), meta["train_counts"]
            )
            context = {"tau_val_scores": {f"{t:g}": round(100 * s, 4) for t, s in scores.items()}}
            if d.main:
                print(
                    f"tau {tau:g}: the best mean per-class accuracy on the val split "
                    f"({100 * scores[tau]:.2f}%, tau 0: {100 * scores[0.0]:.2f}%)"
                )
        logits, labels = split_logits(scorer, eval_loader(cfg, d, split, views), d, dt)
        metrics = shot_metrics(ranked(adjusted(logits, meta["train_counts"], tau)), labels, meta)
        if d.main:
            metrics = write_report(
                metrics,
                meta,
                where,
                f"{cfg.model.name} {'zero-shot' if ckpt is None else ckpt.name}, {split}",
                {
                    "split": split,
                    "stage": state["stage"] if state else 0,
                    "run": where.name,
                    "posthoc_tau": tau,
                    "tte_views": cfg.data.tte_views if views is None else views,
                    "tte_crops": cfg.data.tte_crops,
                    "data": cfg.data.path,
                    **context,
                    "checkpoint": str(ckpt) if ckpt else f"{cfg.model.name} {cfg.model.pretrained}",
                },
            )
        return metrics
