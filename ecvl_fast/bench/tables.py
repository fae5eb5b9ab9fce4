"""Each benchmark's console table, and its JSON (`--json`) and new/old ratios (`--compare`):
what the `bench` commands print. Under torchrun only rank 0 prints and writes."""

from __future__ import annotations

import json
from pathlib import Path

from ecvl_fast import EcvlError


def _main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def report(
    title: str,
    columns: tuple,
    rows: list[tuple],
    result: dict,
    json_out: Path | None = None,
    compare_to: Path | None = None,
) -> None:
    """The table on the console; the raw results as JSON when asked; ratios against an earlier run."""
    if not _main_rank():
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="right")
    for row in rows:
        t.add_row(*row)
    Console().print(t)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))
    if compare_to:
        from ecvl_fast.bench.device import compare

        if not Path(compare_to).is_file():
            raise EcvlError(f"{compare_to}: no such benchmark JSON")
        ratios = compare(result, json.loads(Path(compare_to).read_text()))
        report(
            f"against {compare_to}",
            ("metric", "new", "old", "new/old"),
            [(k, f"{a:.1f}", f"{b:.1f}", f"{r:.2f}x") for k, a, b, r in ratios],
            {},
        )


def _where(r: dict) -> str:
    """The machine in a title: the result's own line, or `describe()` of a machine_info block."""
    from ecvl_fast.bench.machine import describe

    return r["machine"] if isinstance(r["machine"], str) else describe()


def loader(r: dict, json_out=None) -> None:
    c, k = r["config"], r["kernels"]
    report(
        f"loader bench: {c['res']} px, batch {c['batch']}, {c['workers']} workers, "
        f"{c['dali_threads']} DALI threads, 2 views, k=2 ({_where(r)})",
        ("contender", "images/s", "ratio"),
        [
            (
                "FFCV -> DALI",
                f"{r['ffcv_dali_img_s']:.0f}",
                f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
            ),
            ("torchvision/PIL peer", f"{r['torchvision_img_s']:.0f}", "1.00x"),
            (f"kernels numba, N={k['n']:,}", f"{k['numba_s'] * 1e3:.1f} ms/epoch", f"{k['speedup']:.1f}x"),
            (f"kernels numpy, N={k['n']:,}", f"{k['numpy_s'] * 1e3:.1f} ms/epoch", "1.00x"),
        ],
        r,
        json_out,
    )


def kernels(r: dict, json_out=None) -> None:
    rows = [
        ("numpy (vectorised)", f"{r['cpu']['numpy_s'] * 1e3:.1f}", "1.0x"),
        ("numba njit", f"{r['cpu']['numba_s'] * 1e3:.1f}", f"{r['cpu']['speedup']:.1f}x"),
    ]
    if r["cuda"]:
        rows.append(
            ("numba.cuda", f"{r['cuda']['cuda_s'] * 1e3:.2f}", f"{r['cpu']['numpy_s'] / r['cuda']['cuda_s']:.1f}x")
        )
    report(
        f"momentum kernels, N={r['cpu']['n']:,} ({_where(r)})",
        ("implementation", "ms / epoch", "vs numpy"),
        rows,
        r,
        json_out,
    )


def convert(r: dict, workers: int, json_out=None) -> None:
    rows = [
        (
            fmt,
            str(r[fmt]["images"]),
            f"{r[fmt]['seconds']:.2f}",
            f"{r[fmt]['img_s']:.0f}",
            f"{r[fmt]['bytes'] / 1e6:.1f}",
        )
        for fmt in ("raw", "jpg")
    ]
    report(
        f"convert cifar10-lt, {workers} workers ({_where(r)})",
        ("format", "images", "seconds", "images/s", "MB"),
        rows,
        r,
        json_out,
    )


def step(r: dict, json_out=None, compare_to=None) -> None:
    c = r["config"]
    report(
        f"train step: {c['model']}, {c['res']} px, batch {c['batch_per_device']}/device "
        f"({r['machine']['gpu'] or 'CPU'})",
        ("stage", "img/s per device", "img/s total", "first step s", "peak GB", "trained params"),
        [
            (
                s,
                f"{r[s]['img_s']:.0f}",
                f"{r[s]['img_s_total']:.0f}",
                f"{r[s]['first_step_s']:.2f}",
                "-" if r[s]["peak_device_mem_gb"] is None else f"{r[s]['peak_device_mem_gb']:.1f}",
                f"{r[s]['trained_params']:,}",
            )
            for s in ("stage1", "stage2", "lift")
            if s in r
        ],
        r,
        json_out,
        compare_to,
    )


def augment(r: dict, json_out=None, compare_to=None) -> None:
    c = r["config"]
    report(
        f"augment: {c['res']} px, 2 views, k=2 ({c['device']}; {r['source']})",
        ("contender", "img/s", "ratio"),
        [
            ("DALI, memory-driven RandAugment", f"{r['dali_img_s']:.0f}", f"{r['ratio']:.2f}x"),
            (f"PIL peer, {c['peer_workers']} workers", f"{r['peer_img_s']:.0f}", "1.00x"),
            (
                "DALI's trivial_augment_wide (GPU peer)",
                f"{r['dali_peer_img_s']:.0f}",
                f"{r['dali_peer_img_s'] / r['peer_img_s']:.2f}x (ours: {r['ratio_dali_peer']:.2f}x it)",
            ),
        ],
        r,
        json_out,
        compare_to,
    )


def train(r: dict, json_out=None, compare_to=None) -> None:
    c = r["config"]
    report(
        f"stage-2 training: {c['model']}, {c['res']} px, batch {c['batch']} ({c['device']}; {r['source']})",
        ("feeder", "img/s", "data stall", "ratio"),
        [
            (
                name,
                f"{r[name]['img_s']:.0f}",
                f"{100 * r[name]['data_stall']:.1f}%",
                f"{r[name]['img_s'] / r['peer']['img_s']:.2f}x",
            )
            for name in ("dali", "peer")
        ],
        r,
        json_out,
        compare_to,
    )


def infer(r: dict, json_out=None, compare_to=None) -> None:
    c = r["config"]
    report(
        f"inference: {c['model']}, {c['res']} px ({c['device']}; {r['source']})"
        + (", compiled as one frozen graph" if c.get("compile") else ""),
        ("images", "img/s", "first pass s"),
        [(str(c["images"]), f"{r['img_s']:.0f}", f"{r['first_pass_s']:.1f}")],
        r,
        json_out,
        compare_to,
    )


def profile(r: dict, json_out=None) -> None:
    c, m = r["config"], r["median_ms"]
    report(
        f"stage-2 step fed by DALI, per batch (median ms): {c['model']}, {c['res']} px, batch {c['batch']}, "
        f"DALI queue {c['dali_queue']} ({c['device']}; {r['source']}); {r['img_s']:.0f} img/s, "
        f"data stall {100 * r['data_stall']:.1f}%",
        ("where", "what", "ms"),
        [
            ("feeder", "feed DALI (draws, copies)", f"{m['feed_s']:.2f}"),
            ("feeder", "schedule DALI's run", f"{m['schedule_s']:.2f}"),
            ("feeder", "wait for DALI's output", f"{m['outputs_wait_s']:.2f}"),
            ("feeder", "copy out of DALI", f"{m['copy_s']:.2f}"),
            ("loop", "wait for the batch", f"{m['data_wait_s']:.2f}"),
            ("loop", "step (host)", f"{m['step_host_s']:.2f}"),
            ("loop", "step (device)", f"{m['step_device_s']:.2f}"),
        ],
        r,
        json_out,
    )
    if _main_rank():
        print("most self time per step (torch.profiler):")
        for k in r["kernels"][:12]:
            print(f"  {k['self_ms']:8.2f} ms  x{k['calls']:<5} {k['name']}")
