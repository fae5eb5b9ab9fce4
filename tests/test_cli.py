"""Every `ecvl-fast` command is run by some test: the ones no other test file runs are smoke-tested
here at the smallest size that still exercises them (exit 0, and they write what they say).
`demo` runs in test_ablate.py, as the first half of the ablation test."""

import json
import re
from pathlib import Path

import typer

from ecvl_fast.cli import app, main


def command_paths(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from command_paths(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


def test_every_command_is_run_by_a_test():
    """A command that no test calls breaks unseen (as `bench loader` once did). A test "calls" a
    command when its source holds the call, as main([...]) or on a subprocess command line."""
    source = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    paths = list(command_paths(typer.main.get_command(app)))
    assert ("bench", "loader") in paths and ("train",) in paths
    missing = [
        " ".join(p) for p in paths if not re.search(r'\[\s*"' + r'",\s*"'.join(p) + r'"', source)
    ]  # ["bench", "loader" ... or [..., "train"
    assert not missing, f"commands no test runs: {missing}"


def test_bench_loader_kernels_convert(tmp_path, mnist):
    out = tmp_path / "loader.json"
    assert (
        main(
            [
                "bench",
                "loader",
                "--data",
                str(mnist),
                "--res",
                "32",
                "--batch",
                "32",
                "--min-images",
                "64",
                "--kernels-n",
                "2000",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["ffcv_dali_img_s"] > 0 and r["torchvision_img_s"] > 0 and r["kernels"]["n"] == 2000
    assert abs(r["ratio"] - r["ffcv_dali_img_s"] / r["torchvision_img_s"]) < 1e-9
    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--n", "2000", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["cpu"]["numba_s"] > 0 and r["cpu"]["n"] == 2000
    out = tmp_path / "convert.json"
    assert main(["bench", "convert", "--per-class", "100", "--workers", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["raw"]["images"] == r["jpg"]["images"] > 0 and r["raw"]["img_s"] > 0
    for name in ("loader", "kernels", "convert"):  # every result names the code that made it
        machine = json.loads((tmp_path / f"{name}.json").read_text())["machine"]
        assert machine["ecvl_fast"] and "commit" in machine and machine["cpus"] >= 1
    out = tmp_path / "ops.json"
    assert main(["bench", "ops", "--res", "32", "--batch", "16", "--seconds", "0.05", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    from ecvl_fast.loaders.randaug_ops import OPS

    assert len(r["img_s"]) == 3 + len(OPS) and all(v > 0 for v in r["img_s"].values())
    assert r["added_us_per_image"]["RA graph, M = 0"] == 0 and r["machine"]["ecvl_fast"]


def test_demo_pins_kernels_and_threads():
    """What `ecvl-fast demo` sets before torch loads takes effect: AVX2 kernels, 2 threads."""
    import subprocess
    import sys

    code = (
        "import os; [os.environ.pop(k, None) for k in ('ATEN_CPU_CAPABILITY', 'OMP_NUM_THREADS')]; "
        "from ecvl_fast.experiments.demo import pin_numerics; first = pin_numerics(); import torch; "
        "print(first, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), pin_numerics())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "AVX2", "2", "False"], out.stderr[-2000:]
