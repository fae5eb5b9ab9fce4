"""`ecvl-fast ablate`: the paper's ablation as one command, over seeds, on the same data.

Per seed: stage 1 once, then on those same frozen encoders the stage-2 rows, which differ only in
the loss and the augmentation (same class-balanced sampler, same two views, same steps). The
default rows are the paper's:

- ballad:   prompt CE only (no L_DCVL, no RandAugment);
- momentum: + L_DCVL (eq. 11), the bank updated (eqs. 8-9) but M unused;
- ecvl:     + the memory-driven RandAugment driven by M (eq. 10).

`--rows` picks others by name: the ECVL+ variants (`ecvl-class`, `ecvl-ce`, ...), each named by
what it changes in the memory, and the no-memory controls (`freq-rare`, `freq-common`), where M
comes from class size alone (docs/study-ecvl-plus.md).

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
from ecvl_fast.config import Config, load_config
from ecvl_fast.evaluate import EMPTY, METRICS, read_metrics
from ecvl_fast.files import atomic_write

PAPER_MEMORY = {"m_source": "dcvl", "m_scope": "sample", "m_direction": "hard"}


def _memory(**changes) -> dict:
    return {"stage2": {"randaug": True}, "aug": {**PAPER_MEMORY, **changes}}


# row -> (settings per config section, label, its no-memory control)
STAGE2_ROWS = {
    "ballad": ({"stage2": {"dcvl_weight": 0.0, "randaug": False}, "aug": PAPER_MEMORY}, "BALLAD", None),
    "momentum": ({"stage2": {"randaug": False}, "aug": PAPER_MEMORY}, "+ momentum", None),
    "ecvl": (_memory(), "ECVL", "freq-rare"),
    "ecvl-class": (_memory(m_scope="class"), "ECVL, M per class", "freq-rare"),
    "ecvl-ce": (_memory(m_source="ce"), "ECVL, M from CE", "freq-rare"),
    "ecvl-ce-class": (_memory(m_source="ce", m_scope="class"), "ECVL, M per class from CE", "freq-rare"),
    "ecvl-class-easy": (_memory(m_scope="class", m_direction="easy"), "ECVL, M per class, reversed",
                        "freq-common"),
    "ecvl-ce-class-easy": (_memory(m_source="ce", m_scope="class", m_direction="easy"),
                           "ECVL, M per class from CE, reversed", "freq-common"),
    "freq-rare": (_memory(m_source="frequency"), "control: M by rarity", None),
    "freq-common": (_memory(m_source="frequency", m_direction="easy"), "control: M by class size", None),
}


def _no_dcvl(sections: dict) -> dict:
    """A row's settings with BALLAD's loss (no L_DCVL term; the study in docs/study-tiny-imagenet.md found that term
    costs the tail): BALLAD + RandAugment driven by the same M."""
    return {"stage2": {**sections["stage2"], "dcvl_weight": 0.0}, "aug": sections["aug"]}


def _without_dcvl(row: str) -> tuple:
    sections, label, control = STAGE2_ROWS[row]
    return _no_dcvl(sections), "BALLAD + RA, " + label.removeprefix("ECVL, "), control and "ballad+" + control


for _row in ("ecvl-ce-class", "ecvl-ce-class-easy", "freq-rare", "freq-common"):
    STAGE2_ROWS["ballad+" + _row.removeprefix("ecvl-")] = _without_dcvl(_row)
# Ahn et al.'s level-of-learning rule (docs/study-ecvl-plus.md): per class, rising while the class is learned
STAGE2_ROWS["ballad+lol"] = (_no_dcvl(_memory(m_source="lol", m_scope="class", m_direction="easy")),
                             "BALLAD + RA, M per class by level of learning", "ballad+freq-common")
# The best variant measured (docs/study-ecvl-plus.md; chosen on the val split by the rule fixed before the
# runs: the highest mean few-shot accuracy, over all three rounds), under its own name. It does not
# beat its control there.
STAGE2_ROWS["ecvl+"] = (STAGE2_ROWS["ballad+lol"][0],
                        "ECVL+ (best measured: BALLAD + RA, M per class by level of learning)", "ballad+freq-common")
DEFAULT_ROWS = ("ballad", "momentum", "ecvl")
LABELS = {"zero-shot": "zero-shot", "stage1": "stage 1", **{k: v[1] for k, v in STAGE2_ROWS.items()}}


def parse_rows(text: str) -> tuple[str, ...]:
    rows = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in rows if r not in STAGE2_ROWS]
    if unknown or not rows or len(set(rows)) != len(rows):
        raise EcvlError(f"--rows {text!r}: expected distinct names from {', '.join(STAGE2_ROWS)}")
    return rows


def _with(cfg: Config, section: str, **values) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def _finished(folder: Path, cfg: Config, ignore: tuple[str, ...] = ()) -> dict | None:
    """The saved metrics of a row trained with this config (sections in `ignore` aside), else None."""
    metrics, saved = folder / "metrics.json", folder / "config.toml"
    if not (metrics.is_file() and saved.is_file()):
        return None
    try:
        old, new = load_config(saved).to_dict(), cfg.to_dict()
    except EcvlError:
        return None
    if any(old[k] != new[k] for k in new if k not in ignore):
        return None
    return read_metrics(metrics)


def _stage2_cfg(cfg: Config, row: str) -> Config:
    sections = STAGE2_ROWS[row][0]
    cfg = _with(cfg, "stage2", **{**sections["stage2"], "init": ""})
    return _with(cfg, "aug", **sections["aug"])


def run_ablation(cfg: Config, seeds: list[int], log=print, rows: tuple[str, ...] = DEFAULT_ROWS) -> dict:
    from ecvl_fast import dist as D

    with D.session(cfg.run.device, cfg.dist.backend) as d:  # one process group for every row
        return _ablation(cfg, seeds, log, d.main, rows)


def planned_runs(cfg: Config, seeds: list[int], rows: tuple[str, ...] = DEFAULT_ROWS) -> list[tuple]:
    """(name, stage, config, folder) of every run the ablation holds, in order (for --dry-run)."""
    runs = []
    for seed in seeds:
        base = _with(cfg, "run", seed=seed, out=str(Path(cfg.run.out) / f"seed{seed}"))
        runs.append((f"seed {seed} stage 1", 1, base, Path(base.run.out)))
        runs += [(f"seed {seed} {row}", 2, _stage2_cfg(base, row), Path(base.run.out) / row) for row in rows]
    return runs


def _ablation(cfg: Config, seeds: list[int], log, main: bool, rows: tuple[str, ...] = DEFAULT_ROWS) -> dict:
    from ecvl_fast import train as training

    out = Path(cfg.run.out)
    if main:
        print(f"ablation: {out}")
    per_seed: dict[str, dict[int, dict]] = {}
    if cfg.model.pretrained not in ("", "none"):
        per_seed["zero-shot"] = {seeds[0]: _zero_shot(cfg, out / "zero-shot", main)}
    for seed in seeds:
        base = _with(cfg, "run", seed=seed, out=str(out / f"seed{seed}"))
        seed_dir = Path(base.run.out)
        done = _finished(seed_dir, base, ignore=("stage2",))  # stage 1 does not read [stage2]
        if done is None:
            log(f"seed {seed}: stage 1")  # every rank decides alike: it reads the same finished files
            done = training.main(base, stage=1)
        per_seed.setdefault("stage1", {})[seed] = done
        for row in rows:
            row_cfg = _stage2_cfg(base, row)
            done = _finished(seed_dir / row, row_cfg)
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
        raise EcvlError(f"writing the ablation summary failed ({first_line(e)}); the trained rows are "
                        f"kept in {', '.join(folders)}: run the same command again to summarise them") from None
    return result


def last_val(folder: Path) -> dict | None:
    """The last epoch's validation scores in a run's log.jsonl (a dataset with a val split): what
    settings are chosen on, so that the test split is read once."""
    log = folder / "log.jsonl"
    if not log.is_file():
        return None
    for line in reversed(log.read_text().splitlines()):
        r = json.loads(line)
        if r.get("val_all") is not None:
            return {"all": r["val_all"], **(r.get("val_groups") or {}), "macro_f1": r.get("val_macro_f1")}
    return None


def _zero_shot(cfg: Config, folder: Path, main: bool) -> dict:
    from ecvl_fast.eval_cli import run_eval

    saved = folder / "metrics.json"
    if saved.is_file() and (folder / "pretrained.txt").is_file() and \
            (folder / "pretrained.txt").read_text() == f"{cfg.model.name} {cfg.model.pretrained} {cfg.data.path}":
        return read_metrics(saved)
    metrics = run_eval(cfg, None, None, cfg.data.eval_split, folder)
    if main:
        (folder / "pretrained.txt").write_text(f"{cfg.model.name} {cfg.model.pretrained} {cfg.data.path}")
    return metrics


def summarise(per_seed: dict[str, dict[int, dict]], cfg: Config, seeds: list[int]) -> dict:
    rows = []
    for name, runs in per_seed.items():
        stats = {}
        for k in METRICS:
            vals = [r[k] for r in runs.values() if r[k] is not None]
            stats[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0} \
                if vals else None
        vals = [r["val"] for r in runs.values() if r.get("val")]
        if len(vals) == len(runs):  # validation means, for choosing a row without the test split
            stats["val"] = {k: float(np.mean([v[k] for v in vals])) for k in ("few", "all", "macro_f1")
                            if all(v.get(k) is not None for v in vals)}
        rows.append({"name": name, "label": LABELS[name], "seeds": list(runs), "per_seed": list(runs.values()),
                     **stats})
    return {"data": cfg.data.path, "model": cfg.model.name, "pretrained": cfg.model.pretrained,
            "seeds": seeds, "config": cfg.to_dict(), "rows": rows, "paired": paired(per_seed, seeds)}


PAIRED = ("few", "macro_f1", "all")


OTHER_CONTROL = {"freq-rare": "freq-common", "freq-common": "freq-rare",
                 "ballad+freq-rare": "ballad+freq-common", "ballad+freq-common": "ballad+freq-rare"}


def paired(per_seed: dict[str, dict[int, dict]], seeds: list[int]) -> list[dict]:
    """Each stage-2 row minus BALLAD and minus its no-memory control, seed by seed (the same
    stage-1 encoders on both sides of each difference), with the mean and std of the differences.
    A memory row is also set against the other control when it ran: which way its M points is
    what the memory finds, so either class-size rule may be the one it has to beat."""
    out = []
    for row in per_seed:
        if row not in STAGE2_ROWS:
            continue
        own = STAGE2_ROWS[row][2]
        for other in ("ballad", own, OTHER_CONTROL.get(own)):
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
                entry[k] = {"per_seed": d, "mean": float(np.mean(d)),
                            "std": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0}
            out.append(entry)
    return out


def print_ablation(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{result['model']} on {Path(result['data']).name}: mean ± std over seeds "
                    f"{', '.join(map(str, result['seeds']))} (%)")
    t.add_column("row")
    for k in METRICS:
        t.add_column(k, justify="right")
    for row in result["rows"]:
        cells = [EMPTY if row[k] is None else f"{100 * row[k]['mean']:.2f} ± {100 * row[k]['std']:.2f}" for k in METRICS]
        t.add_row(row["label"], *cells)
    console = Console(width=max(120, Console().width))
    console.print(t)
    val = [(row["label"], row["val"]) for row in result["rows"] if row.get("val")]
    if val:
        print("val split (last epoch, mean over seeds; choose on these): " + "; ".join(
            f"{label} " + " ".join(f"{k} {100 * v:.2f}" for k, v in scores.items()) for label, scores in val))
    if result.get("paired"):
        t = Table(title="paired by seed: row minus BALLAD, and minus its no-memory control (points; per seed, mean ± std)")
        for col in ("row", "minus", *PAIRED):
            t.add_column(col, justify="left" if col in ("row", "minus") else "right")
        for e in result["paired"]:
            t.add_row(LABELS[e["row"]], LABELS[e["against"]], *(
                EMPTY if e[k] is None else
                " ".join(f"{100 * v:+.2f}" for v in e[k]["per_seed"]) + f"  ({100 * e[k]['mean']:+.2f} ± {100 * e[k]['std']:.2f})"
                for k in PAIRED))
        console.print(t)
        skipped = sorted({k for e in result["paired"] for k in e.get("skipped", ())})
        if skipped:
            print(f"paired differences skipped for {', '.join(skipped)}: the shot group is empty in this dataset "
                  f"({EMPTY} in the tables, null in ablation.json)")
    print("BALLAD: adapter on class-balanced batches, prompt CE only; + momentum: adds L_DCVL (eq. 11), the bank "
          "updated, M unused; ECVL: adds the memory-driven RandAugment (eq. 10). Same stage-1 encoders, sampler, "
          "views and steps in every row; the others change only where M comes from (docs/study-ecvl-plus.md).")


def plot_rows(result: dict, path: Path) -> None:
    """Bars per shot group (and all, macro-F1), one per row, with the std over seeds."""
    from ecvl_fast.evaluate import pyplot

    plt = pyplot()
    if plt is None:
        return

    rows = result["rows"]
    groups = [g for g in ("many", "medium", "few", "all", "macro_f1") if any(row[g] for row in rows)]  # empty groups left out
    width = 0.8 / max(1, len(rows))
    colours = plt.get_cmap("tab20" if len(rows) > 10 else "tab10").colors  # no colour twice
    fig, ax = plt.subplots(figsize=(8 + 3 * (len(rows) > 6), 4))
    for i, row in enumerate(rows):
        x = np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width
        mean = [100 * row[g]["mean"] if row[g] else np.nan for g in groups]
        std = [100 * row[g]["std"] if row[g] else np.nan for g in groups]
        ax.bar(x, mean, width, yerr=std, capsize=2, label=row["label"], color=colours[i % len(colours)])
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("test accuracy / macro-F1 (%)")
    ax.set_title(f"{result['model']} on {Path(result['data']).name}, seeds {result['seeds']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EcvlError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise EcvlError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def export_weights(ckpt: Path, out: Path) -> None:
    """The CLIP weights of an ecvl-fast checkpoint as a file `model.pretrained` can name (open_clip's
    {"state_dict": ...} form), written to a temp file and renamed."""
    import torch

    from ecvl_fast import checkpoint as ckpt_io

    state = ckpt_io.load(ckpt)
    clip = {k.removeprefix("clip."): v for k, v in state["model"].items()}
    atomic_write(out, lambda tmp: torch.save({"state_dict": clip, "model_name": state["model_name"]}, tmp))
