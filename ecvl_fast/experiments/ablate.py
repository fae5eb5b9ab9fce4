"""`ecvl-fast ablate`: the paper's ablation as one command, over seeds, on the same data.

Per seed: stage 1 once, then on those same frozen encoders the stage-2 rows named by `--rows`
(by default the paper's: ballad, momentum, ecvl). Each row is described, and its settings declared,
once, in `ecvl_fast.method.rows` (the rows named after a recipe take its settings from
`ecvl_fast.recipes`). Every row trains the config's stage2.epochs, except a row that declares
its own budget (LIFT+'s 5 epochs at lr 0.02); what the command line sets wins over any row.

Zero-shot (eq. 6) comes first when `model.pretrained` gives weights; it has no randomness, so it
is evaluated once. A row whose metrics.json exists beside the same config.toml is reused, so an
interrupted ablation continues where it stopped, and rows added later train only themselves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ecvl_fast import EcvlError, first_line
from ecvl_fast.config import Config, check_together
from ecvl_fast.evaluation.metrics import METRICS
from ecvl_fast.evaluation.reports import PAIRED, plot_rows, print_ablation, read_metrics
from ecvl_fast.method.rows import DEFAULT_ROWS, LABELS, ROWS, other_control
from ecvl_fast.run.files import atomic_write
from ecvl_fast.run.lifecycle import finished
from ecvl_fast.run.logs import epoch_val, read_log


def _with(cfg: Config, section: str, **values) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def _finished(folder: Path, cfg: Config, stage: int) -> dict | None:
    """The metrics of a run finished in `folder` with this config (run/lifecycle.finished), else None."""
    epochs = cfg.stage1.epochs if stage == 1 else cfg.stage2.epochs
    metrics = finished(folder, cfg, epochs, stage)
    return None if metrics is None else read_metrics(metrics)


def _stage2_cfg(cfg: Config, row: str, pinned: frozenset = frozenset()) -> Config:
    """The row's settings over `cfg`, except the keys in `pinned` ((section, key) the command line
    set: `--set aug.crop_m=0.25`, `--epochs`, `--trial`), which keep `cfg`'s values."""
    r = ROWS[row]
    parts = {"stage2": {**r.stage2, "init": ""}, "aug": r.aug, "data": r.data}
    if parts["stage2"].get("peft") == "auto" and cfg.stage2.peft != "none":
        del parts["stage2"]["peft"]  # a LIFT row keeps the light module the config names
    for section, values in parts.items():
        cfg = _with(cfg, section, **{k: v for k, v in values.items() if (section, k) not in pinned})
    return check_together(cfg)


def run_ablation(
    cfg: Config, seeds: list[int], log=print, rows: tuple[str, ...] = DEFAULT_ROWS, pinned: frozenset = frozenset()
) -> dict:
    """`pinned`: the (section, key) settings the command line set, which win over every row's."""
    from ecvl_fast.run import dist as D

    with D.session(cfg.run.device, cfg.dist.backend) as d:  # one process group for every row
        return _ablation(cfg, seeds, log, d.main, rows, pinned)


def planned_runs(
    cfg: Config, seeds: list[int], rows: tuple[str, ...] = DEFAULT_ROWS, pinned: frozenset = frozenset()
) -> list[tuple]:
    """(name, stage, config, folder) of every run the ablation holds, in order (for --dry-run)."""
    runs = []
    for seed in seeds:
        base = _with(cfg, "run", seed=seed, out=str(Path(cfg.run.out) / f"seed{seed}"))
        if cfg.stage1.epochs:  # 0: the rows start from model.pretrained
            runs.append((f"seed {seed} stage 1", 1, base, Path(base.run.out)))
        runs += [(f"seed {seed} {row}", 2, _stage2_cfg(base, row, pinned), Path(base.run.out) / row) for row in rows]
    return runs


def _ablation(
    cfg: Config,
    seeds: list[int],
    log,
    main: bool,
    rows: tuple[str, ...] = DEFAULT_ROWS,
    pinned: frozenset = frozenset(),
) -> dict:
    planned_runs(cfg, seeds, rows, pinned)  # every row's config checked before any run trains
    from ecvl_fast.training import loop as training

    out = Path(cfg.run.out)
    if main:
        print(f"ablation: {out}")
    per_seed: dict[str, dict[int, dict]] = {}
    if cfg.model.pretrained not in ("", "none"):
        per_seed["zero-shot"] = {seeds[0]: _zero_shot(cfg, out / "zero-shot")}
    for seed in seeds:
        base = _with(cfg, "run", seed=seed, out=str(out / f"seed{seed}"))
        seed_dir = Path(base.run.out)
        if cfg.stage1.epochs:  # 0: no stage 1, the rows start from model.pretrained (single-stage)
            done = _finished(seed_dir, base, stage=1)
            if done is None:
                log(f"seed {seed}: stage 1")  # every rank decides alike: it reads the same finished files
                done = training.main(base, stage=1)
            per_seed.setdefault("stage1", {})[seed] = done
        for row in rows:
            row_cfg = _stage2_cfg(base, row, pinned)
            done = _finished(seed_dir / row, row_cfg, stage=2)
            if done is None:
                log(f"seed {seed}: stage 2, {row}")
                done = training.main(row_cfg, stage=2, out=seed_dir / row)
            per_seed.setdefault(row, {})[seed] = {**done, "val": last_val(seed_dir / row)}
    try:
        result = summarise(per_seed, cfg, seeds)
        if main:  # under torchrun every rank has the metrics; rank 0 writes
            atomic_write(out / "ablation.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
            plot_rows(result, out / "ablation.png")
            print_ablation(result)
            print(f"ablation done: {out / 'ablation.json'}, {out / 'ablation.png'}")
    except Exception as e:  # every row is trained and saved: never lose them to the summary
        folders = sorted({str(out / f"seed{s}" / r) for r in rows for s in per_seed.get(r, {})})
        raise EcvlError(
            f"writing the ablation summary failed ({first_line(e)}); the trained rows are "
            f"kept in {', '.join(folders)}: run the same command again to summarise them"
        ) from None
    return result


def last_val(folder: Path) -> dict | None:
    """The last epoch's validation scores in a run's log.jsonl (a dataset with a val split): what
    settings are chosen on, so that the test split is read once."""
    log = folder / "log.jsonl"
    if not log.is_file():
        return None
    for r in reversed(read_log(log)):
        if epoch_val(r) is not None:
            return epoch_val(r)
    return None


def _zero_shot(cfg: Config, folder: Path) -> dict:
    from ecvl_fast.experiments.evaluate import run_eval

    saved = folder / "metrics.json"
    if saved.is_file():  # evaluated already: what its metrics.json says it evaluated is this
        said = json.loads(saved.read_text())
        if (said.get("checkpoint"), said.get("data"), said.get("split")) == (
            f"{cfg.model.name} {cfg.model.pretrained}",
            cfg.data.path,
            cfg.data.eval_split,
        ):
            return read_metrics(saved)
    return run_eval(cfg, None, None, cfg.data.eval_split, folder)


def summarise(per_seed: dict[str, dict[int, dict]], cfg: Config, seeds: list[int]) -> dict:
    rows = []
    for name, runs in per_seed.items():
        stats = {}
        for k in METRICS:
            vals = [r[k] for r in runs.values() if r[k] is not None]
            stats[k] = (
                {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
                if vals
                else None
            )
        vals = [r["val"] for r in runs.values() if r.get("val")]
        if len(vals) == len(runs):  # validation means, for choosing a row without the test split
            stats["val"] = {
                k: float(np.mean([v[k] for v in vals]))
                for k in ("few", "all", "macro_f1")
                if all(v.get(k) is not None for v in vals)
            }
        rows.append(
            {"name": name, "label": LABELS[name], "seeds": list(runs), "per_seed": list(runs.values()), **stats}
        )
    return {
        "data": cfg.data.path,
        "model": cfg.model.name,
        "pretrained": cfg.model.pretrained,
        "seeds": seeds,
        "config": cfg.to_dict(),
        "rows": rows,
        "paired": paired(per_seed, seeds),
    }


def paired(per_seed: dict[str, dict[int, dict]], seeds: list[int]) -> list[dict]:
    """Each stage-2 row minus BALLAD and minus its no-memory control, seed by seed (the same
    stage-1 encoders on both sides of each difference), with the mean and std of the differences.
    A memory row is also set against the other control when it ran: which way its M points is
    what the memory finds, so either class-size rule may be the one it has to beat."""
    out = []
    for row in per_seed:
        if row not in ROWS:
            continue
        own = ROWS[row].control
        for other in ("ballad", own, other_control(own)):
            if other is None or other == row or other not in per_seed:
                continue
            both = [s for s in seeds if s in per_seed[row] and s in per_seed[other]]
            entry = {"row": row, "against": other, "seeds": both, "skipped": []}
            for k in PAIRED:
                pairs = [(per_seed[row][s].get(k), per_seed[other][s].get(k)) for s in both]
                if any(a is None or b is None for a, b in pairs):  # an empty shot group: no difference
                    entry[k] = None
                    entry["skipped"].append(k)
                    continue
                d = [a - b for a, b in pairs]
                entry[k] = {
                    "per_seed": d,
                    "mean": float(np.mean(d)),
                    "std": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
                }
            out.append(entry)
    return out


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EcvlError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise EcvlError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds
