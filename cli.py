"""The `ecvl-fast` command (a typer app). Installed as `ecvl_fast.cli`.

Every subcommand turns an `EcvlError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from ecvl_fast import EcvlError
from ecvl_fast.bench import tables
from ecvl_fast.config import trial as as_trial
from ecvl_fast.loaders.convert import DATASETS, ConvertOptions
from ecvl_fast.experiments.demo import DEMO_DATA
from ecvl_fast.experiments.presets import names as preset_names
from ecvl_fast.method.rows import DEFAULT_ROWS, ROWS

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Long-tailed CLIP classifiers (ECVL), fed by FFCV + DALI."
)


def _version(value: bool) -> None:
    if value:
        from ecvl_fast import __version__

        typer.echo(f"ecvl-fast {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Long-tailed CLIP classifiers (ECVL), fed by FFCV + DALI."""


# Short flags for the settings people change most; each stands for its --set key(s).
_CONFIG = typer.Option(
    None, "--config", help=f"a TOML file, or a packaged preset by name ({', '.join(preset_names())})"
)
_SET = typer.Option(None, "--set", help="section.key=value (repeatable); wins over the short flags")
_MODEL = typer.Option(None, "--model", help="= --set model.name (an open_clip model, e.g. ViT-B-16, RN50)")
_EPOCHS = typer.Option(None, "--epochs", help="= --set stageN.epochs, for each stage the command runs")
_LR = typer.Option(None, "--lr", help="= --set stageN.lr, for each stage the command runs")
_BATCH = typer.Option(None, "--batch-size", help="= --set data.batch_size (global, over all GPUs)")
_PRECISION_SET = typer.Option(None, "--precision", help="= --set run.precision (auto, bf16, fp16, fp32)")
_OUT = typer.Option(None, "--out", help="= --set run.out: the run folder (default: runs/<dataset>-<model>)")
_DRY = typer.Option(
    False,
    "--dry-run",
    help="print the resolved config, the data, the runs it would start, "
    "resume or reuse, and the images it would process; train nothing",
)
_TRIAL = typer.Option(
    False,
    "--trial",
    help="a quick trial of the whole command: 3 steps per epoch, at most 2 epochs "
    "per stage, 64 images per evaluation, into <run folder>-trial",
)


def _aliases(stages, model=None, epochs=None, lr=None, batch_size=None, precision=None, out=None) -> list[tuple]:
    """(flag, section.key=value) per short flag given: an error names the flag the user typed."""
    sets = [("--model", f"model.name={model}")] * (model is not None)
    sets += [("--batch-size", f"data.batch_size={batch_size}")] * (batch_size is not None)
    sets += [("--precision", f"run.precision={precision}")] * (precision is not None)
    sets += [("--out", f"run.out={out}")] * (out is not None)
    for s in stages:
        sets += [("--epochs", f"stage{s}.epochs={epochs}")] * (epochs is not None)
        sets += [("--lr", f"stage{s}.lr={lr}")] * (lr is not None)
    return sets


_TTE = typer.Option(
    None,
    "--tte",
    help="test-time views averaged (1 = none, 2 = + mirror, up to 10 with shifted "
    "crops; a model with LIFT's five crops, data.tte_crops = five: 1 or 5); "
    "default: the model's data.tte_views",
)


def _trial(cfg, origins: dict):
    """The config as its quick trial (`config.trial`); the settings it changes are marked --trial."""
    tried = as_trial(cfg)
    before, after = cfg.to_dict(), tried.to_dict()
    changed = {(s, k) for s in after for k in after[s] if after[s][k] != before[s][k]}
    # the trial's epochs are marked even where they did not change: they hold over an ablate row's own
    origins.update({key: "--trial" for key in changed | {("stage1", "epochs"), ("stage2", "epochs")}})
    return tried


def _views(tte: int | None) -> int | None:
    from ecvl_fast.config import AT_LEAST, AT_MOST

    low, high = AT_LEAST["data", "tte_views"], AT_MOST["data", "tte_views"]
    if tte is not None and not low <= tte <= high:
        raise EcvlError(f"--tte {tte}: between {low} (no ensembling) and {high} views")
    return tte


def _tau(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        tau = float(text)
    except ValueError:
        raise EcvlError(f"--tau {text!r}: a number at least 0, or auto") from None
    if not tau >= 0:
        raise EcvlError(f"--tau {text}: must be at least 0")
    return tau


def one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EcvlError as e:  # a preempted run exits with its own status (lifecycle.EXIT_PREEMPTED)
            code = getattr(e, "exit_code", 2)
            typer.echo(f"{'stopped' if code != 2 else 'error'}: {e}", err=True)
            raise typer.Exit(code)
        except FileNotFoundError as e:
            typer.echo(f"error: {e.filename}: no such file", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint waited for
            typer.echo("interrupted: the last checkpoint stands; run the same command to resume", err=True)
            raise typer.Exit(130)
        except OSError as e:  # a full disk, a read-only folder, a permission
            from ecvl_fast.run.files import disk_reason

            where = f"{e.filename}: " if e.filename else ""
            typer.echo(f"error: {where}{disk_reason(e, Path(e.filename or '.').parent)}", err=True)
            raise typer.Exit(2)

    return wrapper


# convert's defaults, as ConvertOptions declares them (the Python API's and the command's are one)
_CONVERT = {f.name: f.default for f in dataclasses.fields(ConvertOptions)}


def print_convert_summary(meta: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    counts, g = meta["train_counts"], meta["groups"]
    t = Table(title=f"{meta['dataset']} -> {out}", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    rows = [("classes", len(counts))]
    rows += [(f"{name} images", n) for name, n in meta["images"].items()]
    rows += [
        ("max / min per class", f"{max(counts)} / {min(counts)}"),
        ("many / medium / few classes", f"{len(g['many'])} / {len(g['medium'])} / {len(g['few'])}"),
        ("skipped (corrupt)", sum(meta["skipped"].values())),
        ("format", f"{meta['format']}, longest side {meta['max_side']} px"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)


@app.command()
@one_line_errors
def convert(
    dataset: str = typer.Argument(..., help=" | ".join(DATASETS)),
    out: Path = typer.Option(..., "--out", help="output folder (train/val/test .beton + meta.json)"),
    source: Optional[Path] = typer.Option(None, help="CIFAR pickle folder / image tree, or ImageFolder root"),
    root: Optional[Path] = typer.Option(None, help="image root for split-file datasets"),
    train_split: Optional[Path] = typer.Option(None, help="OLTR split file: 'relative/path label' lines"),
    val_split: Optional[Path] = typer.Option(None),
    test_split: Optional[Path] = typer.Option(None),
    classes: Optional[Path] = typer.Option(None, help="class names, one per line"),
    wnids: Optional[Path] = typer.Option(None, help="tiny-imagenet-lt: only these wnids (one per line, in this order)"),
    imbalance: float = typer.Option(_CONVERT["imbalance"], help="imbalance factor IF = n_max / n_min"),
    seed: int = typer.Option(_CONVERT["seed"]),
    val_per_class: int = typer.Option(
        _CONVERT["val_per_class"],
        help="a val split of this many images per class, carved from train (seeded; each "
        "class keeps one); tiny-imagenet-lt takes them from its spare images",
    ),
    format: str = typer.Option(_CONVERT["format"], help="raw | jpg"),
    max_res: int = typer.Option(
        _CONVERT["max_res"], help="longest side kept, in pixels (larger images are shrunk; 0 keeps every size)"
    ),
    max_pixels: int = typer.Option(
        _CONVERT["max_pixels"],
        help="refuse (or, with --skip-bad, skip) an image with more pixels, "
        "read from its header before decoding (0: no limit)",
    ),
    jpeg_quality: int = typer.Option(_CONVERT["jpeg_quality"]),
    workers: int = typer.Option(_CONVERT["workers"]),
    overwrite: bool = typer.Option(_CONVERT["overwrite"]),
    skip_bad: bool = typer.Option(_CONVERT["skip_bad"], help="skip corrupt images (counted in meta.json)"),
    many_threshold: int = typer.Option(_CONVERT["many_threshold"], help="many-shot: more than this many train images"),
    few_threshold: int = typer.Option(_CONVERT["few_threshold"], help="few-shot: fewer than this many train images"),
):
    """Write a long-tailed dataset as FFCV .beton files plus meta.json."""
    from ecvl_fast.loaders.convert import ConvertOptions, convert as run_convert

    opts = ConvertOptions(**{k: v for k, v in locals().items() if k in ConvertOptions.__dataclass_fields__})
    meta = run_convert(opts)
    print_convert_summary(meta, out)


@app.command()
@one_line_errors
def verify(data: Path = typer.Argument(..., help="a converted dataset folder")):
    """Hash every .beton of DATA against the sha256 meta.json recorded at convert (training checks
    each file once, then its size and mtime)."""
    from ecvl_fast.loaders.convert import load_meta
    from ecvl_fast.training.data import verify as run_verify

    meta = load_meta(data)
    found = run_verify(data, meta, force=True)
    hashed = [f"{s}.beton" for s, how in found.items() if how == "hashed"]
    none = [f"{s}.beton" for s, how in found.items() if how == "unrecorded"]
    typer.echo(
        f"{data}: {', '.join(hashed) or 'no split'} match meta.json's sha256"
        + (f"; meta.json records none for {', '.join(none)}" if none else "")
    )


def _config(
    config: Optional[str],
    overrides: Optional[list[str]],
    pretrained: Optional[str] = None,
    aliases: list[str] = (),
    origins: dict | None = None,
):
    """--config (a file or a preset's name), then the short flags, then --set, then --pretrained;
    `origins` gets where each setting came from (for --dry-run)."""
    from ecvl_fast.config import load_config
    from ecvl_fast.experiments.presets import resolve

    return load_config(
        resolve(config),
        list(aliases)
        + (overrides or [])
        + ([("--pretrained", f"model.pretrained={pretrained}")] if pretrained else []),
        origins,
    )


@app.command()
@one_line_errors
def train(
    config: Optional[str] = _CONFIG,
    overrides: Optional[list[str]] = _SET,
    pretrained: Optional[str] = typer.Option(None, help="shortcut for --set model.pretrained=TAG|PATH|none"),
    stage: Optional[int] = typer.Option(
        None,
        help="1: fine-tune both encoders; 2: the frozen encoders' adapter (or "
        "LIFT's modules) + L_DCVL + memory-driven RandAugment; default: stage "
        "1, then stage 2 from its best.pt (stage1.epochs = 0: stage 2 alone)",
    ),
    restart: bool = typer.Option(False, help="start over; the run already in the folder is moved to previous-<time>/"),
    model: Optional[str] = _MODEL,
    epochs: Optional[int] = _EPOCHS,
    lr: Optional[float] = _LR,
    batch_size: Optional[int] = _BATCH,
    precision: Optional[str] = _PRECISION_SET,
    out: Optional[str] = _OUT,
    dry_run: bool = _DRY,
    trial: bool = _TRIAL,
):
    """Train (one process, or one per GPU under torchrun): stage 1 into the run folder, stage 2 into
    its stage2/. Re-running the same command continues from the last checkpoint (mid-epoch after a
    preemption); exit status 75 means stopped on SIGTERM/SIGUSR1, 130 on Ctrl-C, with a checkpoint."""
    from ecvl_fast.training import loop as training

    if stage not in (None, 1, 2):
        raise EcvlError(f"--stage {stage}: there are stages 1 and 2")
    stages = (stage,) if stage else (1, 2)
    if stage is None and _config(config, overrides, pretrained).stage1.epochs == 0:
        stages = (2,)  # single-stage (LIFT's form): stage 2 from model.pretrained
    origins = {}
    cfg = _config(
        config, overrides, pretrained, _aliases(stages, model, epochs, lr, batch_size, precision, out), origins
    )
    cfg = _trial(cfg, origins) if trial else cfg
    if dry_run:
        from ecvl_fast.experiments.presets import dry_run as plan

        plan(cfg, [(f"stage {s}", s, cfg, training.run_folder(cfg, s)) for s in stages], origins)
        return
    from ecvl_fast.run import dist as D

    with D.session(cfg.run.device, cfg.dist.backend):  # one process group for both stages (torchrun)
        for s in stages:
            training.main(cfg, stage=s, restart=restart)


@app.command("eval")
@one_line_errors
def evaluate(
    data: Optional[Path] = typer.Option(None, help="converted dataset folder (default: data.path)"),
    ckpt: Optional[Path] = typer.Option(None, help="checkpoint to evaluate (its config is used)"),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="evaluate model.pretrained as is"),
    split: str = typer.Option("test", help="test | val | train: any split the converted folder has"),
    out: Optional[Path] = typer.Option(None, help="where metrics.json and per_class.png go"),
    pretrained: Optional[str] = typer.Option(None, help="shortcut for --set model.pretrained=TAG|PATH|none"),
    config: Optional[str] = typer.Option(
        None,
        "--config",
        help="a TOML file or a preset (--zero-shot: the model and data settings; --ckpt uses its own config)",
    ),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="section.key=value (repeatable)"),
    tau: str = typer.Option(
        "0",
        "--tau",
        help="post-hoc logit adjustment: tau * log(class prior) off the logits; "
        "'auto': the best of 0, 0.25 ... 2 on the val split",
    ),
    tte: Optional[int] = _TTE,
):
    """Many/medium/few/all accuracy, macro-F1 and head-tail gap of a checkpoint or a zero-shot model."""
    from ecvl_fast.experiments.evaluate import run_eval

    if (ckpt is None) == (not zero_shot):
        raise EcvlError("pass exactly one of --ckpt FILE or --zero-shot")
    run_eval(_config(config, overrides, pretrained), data, ckpt, split, out, _tau(tau), _views(tte))


@app.command()
@one_line_errors
def predict(
    images: Optional[list[Path]] = typer.Argument(None, help="image files"),
    ckpt: Path = typer.Option(
        ..., "--ckpt", help="a stage 1/2 checkpoint (last.pt / best.pt), or an exported .pt / .onnx"
    ),
    folder: Optional[Path] = typer.Option(None, help="classify every image under this folder too"),
    top_k: int = typer.Option(5, help="classes per image"),
    out: Optional[Path] = typer.Option(None, help="write the predictions as CSV"),
    strict: bool = typer.Option(False, help="refuse an unreadable image instead of skipping it"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    tte: Optional[int] = _TTE,
    compile: bool = typer.Option(
        False, help="compile the model as one frozen graph first: for many images on a GPU (not an .onnx)"
    ),
):
    """Top-k class names and probabilities for image files (the stage-2 modules applied)."""
    from ecvl_fast.serving.predict import run_predict, write_csv

    if top_k < 1:
        raise EcvlError(f"--top-k {top_k}: must be at least 1")
    preds = run_predict(ckpt, images or [], folder, top_k, strict, device=device, views=_views(tte), compile=compile)
    if out is not None:
        write_csv(preds, out)
    k = max((len(p.classes) for p in preds), default=top_k)
    tables.report(
        f"{ckpt}: {len(preds)} images",
        ("image", "top-1", "p", f"top-{k}"),
        [
            (
                Path(p.path).name,
                p.classes[0],
                f"{p.probs[0]:.3f}",
                ", ".join(f"{c} {q:.2f}" for c, q in zip(p.classes, p.probs)),
            )
            for p in preds[:20]
        ],
        {},
    )


@app.command()
@one_line_errors
def export(
    ckpt: Path = typer.Option(..., "--ckpt", help="a stage 1 or stage 2 checkpoint"),
    out: Path = typer.Option(..., "--out", help="the file to write (model.pt or model.onnx)"),
    format: str = typer.Option(
        "pt", "--format", help="pt (weights, weights_only loadable) | onnx (needs ecvl-fast\\[onnx])"
    ),
    tte: Optional[int] = _TTE,
):
    """A slim classifier to deploy: image encoder, adapter, class text features and names, preprocessing
    (no optimizer, no momentum bank, no text tower). `predict --ckpt` reads it."""
    from ecvl_fast.serving.export import export as run_export

    r = run_export(ckpt, out, format, _views(tte))
    typer.echo(
        f"wrote {out} ({r['bytes'] / 1e6:.1f} MB; the checkpoint: {r['checkpoint_bytes'] / 1e6:.1f} MB), "
        f"{len(r['classes'])} classes, {r['res']} px"
    )


@app.command()
@one_line_errors
def ablate(
    config: Optional[str] = _CONFIG,
    seeds: str = typer.Option("0,1,2", help="comma-separated seeds; one stage 1 and the --rows each"),
    overrides: Optional[list[str]] = _SET,
    pretrained: Optional[str] = typer.Option(None, help="shortcut for --set model.pretrained=TAG|PATH|none"),
    model: Optional[str] = _MODEL,
    epochs: Optional[int] = _EPOCHS,
    lr: Optional[float] = _LR,
    batch_size: Optional[int] = _BATCH,
    precision: Optional[str] = _PRECISION_SET,
    out: Optional[str] = _OUT,
    dry_run: bool = _DRY,
    trial: bool = _TRIAL,
    rows: str = typer.Option(",".join(DEFAULT_ROWS), help=f"stage-2 rows, comma-separated, of: {', '.join(ROWS)}"),
):
    """Zero-shot, stage 1, then the stage-2 rows (BALLAD, + momentum, ECVL by default) over seeds on
    the same stage-1 encoders: a table of mean ± std, paired differences, ablation.json/png."""
    from ecvl_fast.method.rows import parse_rows
    from ecvl_fast.experiments.ablate import parse_seeds, planned_runs, run_ablation

    origins = {}
    cfg = _config(
        config, overrides, pretrained, _aliases((1, 2), model, epochs, lr, batch_size, precision, out), origins
    )
    cfg = _trial(cfg, origins) if trial else cfg
    seeds, rows = parse_seeds(seeds), parse_rows(rows)
    pinned = frozenset(key for key, origin in origins.items() if origin.startswith("--"))  # over the rows'
    if dry_run:
        from ecvl_fast.experiments.presets import dry_run as plan

        plan(cfg, planned_runs(cfg, seeds, rows, pinned), origins)
        return
    run_ablation(cfg, seeds, rows=rows, pinned=pinned)


@app.command()
@one_line_errors
def pretrain(
    weights: Path = typer.Option(
        ..., "--weights", help="the weights file to write (then: --set model.pretrained=FILE)"
    ),
    config: Optional[str] = typer.Option(
        None, "--config", help="a TOML file or a preset; data.path is the pretraining set"
    ),
    overrides: Optional[list[str]] = _SET,
    restart: bool = typer.Option(False, help="start over; the run already in run.out is moved to previous-<time>/"),
    out: Optional[str] = _OUT,
):
    """A stand-in for CLIP pretraining: stage 1 on a (balanced) dataset in the run folder (--out), its
    CLIP weights saved to --weights. Like train, the same command continues an interrupted run."""
    from ecvl_fast.training import loop as training
    from ecvl_fast.experiments.pretrain import export_weights

    cfg = _config(config, overrides, aliases=_aliases((1,), out=out))
    training.main(cfg, stage=1, restart=restart)
    export_weights(Path(cfg.run.out) / "last.pt", weights)
    typer.echo(f"wrote {weights} (use: --set model.pretrained={weights})")


@app.command()
@one_line_errors
def demo(
    data: Path = typer.Option(DEMO_DATA, help="the embedded dataset, converted there on first use"),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="the run folder"),
    config: Optional[str] = typer.Option(None, "--config", help="a TOML file or a preset (default: mnist-demo)"),
    seeds: str = typer.Option("0", help="comma-separated seeds"),
):
    """The embedded default: the ablation on mnist-lt (real digits, long-tailed) with a small CLIP.
    Finished rows are reused, so a second run prints the saved table. Kernels and threads are
    pinned (AVX2, 2 threads) so that the table is the same on every 2-core x86_64 machine."""
    from ecvl_fast.experiments.demo import pin_numerics, run_demo

    from ecvl_fast.experiments.presets import resolve

    pin_numerics()
    run_demo(data, out, resolve(config), seeds)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: tables, and JSON on request.")
app.add_typer(bench_app, name="bench")


@bench_app.command("loader")
@one_line_errors
def bench_loader(
    data: Path = typer.Option(DEMO_DATA, help="a converted dataset (built from mnist-lt if missing)"),
    res: int = typer.Option(32, help="output resolution, e.g. 32 or 224"),
    batch: int = typer.Option(256),
    workers: int = typer.Option(2, help="ffcv threads for both; DataLoader worker processes for the peer"),
    dali_threads: int = typer.Option(
        4, help="DALI's thread pool (per-operator overhead, not pixels, bounds it at 32 px)"
    ),
    min_images: int = typer.Option(4096, help="images timed per contender, after a warm-up pass"),
    kernels_n: int = typer.Option(1_280_000, help="samples for the momentum-kernel benchmark"),
    repeats: int = typer.Option(3, help="alternating timings per contender; the median paired ratio is reported"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results here"),
):
    """FFCV -> DALI memory-driven RandAugment (2 views) vs the torchvision peer; numba vs numpy kernels."""
    from ecvl_fast.bench.host import LoaderBench, run_loader_bench

    _ensure_demo_data(data)
    r = run_loader_bench(
        LoaderBench(data, res, batch, workers, dali_threads, min_images=min_images), kernels_n, repeats
    )
    tables.loader(r, json_out)


@bench_app.command("ops")
@one_line_errors
def bench_ops_cmd(
    res: int = typer.Option(32, help="output resolution (224: decoded at 256)"),
    batch: int = typer.Option(128),
    seconds: float = typer.Option(2.0, help="timed per row"),
    dali_threads: int = typer.Option(2),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results here"),
):
    """The DALI graph alone, per operator: crop only, RandAugment with M = 0 and M ~ U(0,1), each op forced."""
    from ecvl_fast.bench.host import bench_ops

    r = bench_ops(res, batch, seconds, dali_threads)
    tables.report(
        f"DALI graph at {res} px, batch {r['config']['batch']}, 2 views (images fed from memory)",
        ("graph", "img/s", "added us/image"),
        [(k, f"{v:,.0f}", f"{r['added_us_per_image'][k]:+.1f}") for k, v in r["img_s"].items()],
        r,
        json_out,
    )


@bench_app.command("kernels")
@one_line_errors
def bench_kernels_cmd(
    n: int = typer.Option(1_280_000, help="samples (ImageNet-1k train size by default)"),
    json_out: Optional[Path] = typer.Option(None, "--json"),
):
    """One epoch of momentum bookkeeping: numba njit vs numpy on CPU, and numba.cuda when a GPU is present."""
    from ecvl_fast.bench.machine import machine_info
    from ecvl_fast.bench.host import bench_kernels, bench_kernels_cuda

    tables.kernels({"machine": machine_info(), "cpu": bench_kernels(n), "cuda": bench_kernels_cuda(n)}, json_out)


@bench_app.command("convert")
@one_line_errors
def bench_convert_cmd(
    per_class: int = typer.Option(5000, help="synthetic CIFAR-10 train images per class"),
    workers: int = typer.Option(2),
    json_out: Optional[Path] = typer.Option(None, "--json"),
):
    """Convert throughput (images/s) for raw and jpg, on a synthetic CIFAR-10 in the standard pickle format."""
    from ecvl_fast.bench.machine import machine_info
    from ecvl_fast.bench.host import bench_convert

    tables.convert({"machine": machine_info(), **bench_convert(per_class, workers)}, workers, json_out)


_DEVICE = typer.Option("auto", help="auto | cpu | cuda (the local rank's GPU under torchrun)")
_JSON = typer.Option(None, "--json", help="write the results here")
_COMPARE = typer.Option(None, "--compare", help="an earlier run's JSON: print new/old ratios")
_PRECISION = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")


@bench_app.command("step")
@one_line_errors
def bench_step_cmd(
    model: str = typer.Option("RN50"),
    res: int = typer.Option(224),
    batch: int = typer.Option(256, help="per device"),
    device: str = _DEVICE,
    compile: bool = typer.Option(False),
    steps: int = typer.Option(10),
    repeats: int = typer.Option(3),
    precision: str = _PRECISION,
    json_out: Optional[Path] = _JSON,
    compare_to: Optional[Path] = _COMPARE,
):
    """Stage 1 and stage 2 train steps on synthetic batches already on the device (no ffcv or DALI)."""
    from ecvl_fast.bench.device import bench_step

    tables.step(
        bench_step(model, res, batch, device, compile, steps, repeats, precision=precision), json_out, compare_to
    )


@bench_app.command("augment")
@one_line_errors
def bench_augment_cmd(
    data: Optional[Path] = typer.Option(None, help="a converted dataset (else synthetic images)"),
    res: int = typer.Option(224),
    batch: int = typer.Option(256),
    device: str = _DEVICE,
    images: int = typer.Option(4096),
    workers: int = typer.Option(0, help="peer workers; 0 = every core"),
    dali_threads: int = typer.Option(0, help="0 = every core"),
    repeats: int = typer.Option(3),
    json_out: Optional[Path] = _JSON,
    compare_to: Optional[Path] = _COMPARE,
):
    """Memory-driven RandAugment alone (k=2, two views, M ~ U(0,1)): DALI vs the all-core PIL peer."""
    import os

    from ecvl_fast.bench.device import bench_augment

    cores = os.cpu_count() or 1
    tables.augment(
        bench_augment(data, res, batch, device, images, workers or cores, dali_threads or cores, repeats),
        json_out,
        compare_to,
    )


@bench_app.command("train")
@one_line_errors
def bench_train_cmd(
    data: Optional[Path] = typer.Option(None, help="a converted dataset (else synthetic images)"),
    model: str = typer.Option("RN50"),
    res: int = typer.Option(224),
    batch: int = typer.Option(256),
    device: str = _DEVICE,
    images: int = typer.Option(8192),
    workers: int = typer.Option(0, help="0 = every core"),
    dali_threads: int = typer.Option(0, help="0 = every core"),
    epochs: int = typer.Option(2),
    precision: str = _PRECISION,
    json_out: Optional[Path] = _JSON,
    compare_to: Optional[Path] = _COMPARE,
):
    """Stage 2 epochs end to end with each feeder: img/s and the data-stall fraction."""
    import os

    from ecvl_fast.bench.device import bench_train

    cores = os.cpu_count() or 1
    tables.train(
        bench_train(
            data, model, res, batch, device, images, workers or cores, dali_threads or cores, epochs, precision
        ),
        json_out,
        compare_to,
    )


@bench_app.command("profile")
@one_line_errors
def bench_profile_cmd(
    data: Optional[Path] = typer.Option(None, help="a converted dataset (else synthetic images)"),
    model: str = typer.Option("RN50"),
    res: int = typer.Option(224),
    batch: int = typer.Option(256),
    device: str = _DEVICE,
    images: int = typer.Option(8192),
    dali_threads: int = typer.Option(0, help="0 = every core"),
    dali_queue: int = typer.Option(0, help="batches in DALI at once; 0 = 2 on a GPU, 1 on a CPU"),
    precision: str = _PRECISION,
    trace: Optional[Path] = typer.Option(None, help="also write torch.profiler's Chrome trace here"),
    json_out: Optional[Path] = _JSON,
):
    """Where a stage-2 step fed by DALI spends its time, per batch: feeding DALI, its output, the copy
    out, the loop's wait and the step; then the kernels with the most device time (torch.profiler)."""
    import os

    from ecvl_fast.bench.device import bench_profile

    threads = dali_threads or os.cpu_count() or 1
    tables.profile(
        bench_profile(data, model, res, batch, device, images, threads, dali_queue, precision, trace), json_out
    )


@bench_app.command("infer")
@one_line_errors
def bench_infer_cmd(
    ckpt: Optional[Path] = typer.Option(None, help="a stage 1/2 checkpoint (else a random model)"),
    data: Optional[Path] = typer.Option(None, help="a converted dataset: its test split"),
    model: str = typer.Option("RN50"),
    res: int = typer.Option(224),
    batch: int = typer.Option(512),
    device: str = _DEVICE,
    images: int = typer.Option(4096),
    repeats: int = typer.Option(3),
    precision: str = _PRECISION,
    compile: bool = typer.Option(False, help="the classifier compiled as one frozen graph (predict --compile)"),
    json_out: Optional[Path] = _JSON,
    compare_to: Optional[Path] = _COMPARE,
):
    """The predict path (prepare, encode, adapter, eq. 6) on test images in memory: img/s."""
    from ecvl_fast.bench.device import bench_infer

    tables.infer(
        bench_infer(ckpt, data, model, res, batch, device, images, repeats, precision, compile), json_out, compare_to
    )


def _ensure_demo_data(data: Path) -> None:
    from ecvl_fast.experiments.demo import ensure_data

    ensure_data(data)


def main(argv: list[str] | None = None) -> int:
    """Importable entry point: returns the exit status instead of exiting."""
    import click

    try:
        rv = app(args=argv, standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except SystemExit as e:
        return int(e.code or 0)
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
