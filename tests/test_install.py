"""The package as a user installs it: a wheel built from this tree, installed into a fresh venv
(dependencies from the test environment, nothing from the network), then imported and run from
outside the source tree, so nothing can come from the checkout."""

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs_outside_the_tree(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("ecvl_fast-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # the dependencies: this environment's site-packages as a plain path entry (its .pth files,
    # among them the editable install of this checkout, are not processed there)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    run = lambda *args: subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # noqa: E731
    probe = run(
        str(py),
        "-c",
        "import sys, ecvl_fast, ecvl_fast.cli, ecvl_fast.loaders.dali_loader, "
        "ecvl_fast.kernels.bank, ecvl_fast.experiments.demo as d; print(ecvl_fast.__file__); "
        "print(d.DEMO_CONFIG.is_file()); "
        "print(sorted(m for m in ('ffcv', 'nvidia.dali') if m in sys.modules))",
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    where, config, heavy = probe.stdout.split("\n")[:3]
    assert where.startswith(str(site)) and config == "True" and heavy == "[]"  # the wheel's files; lazy imports
    for args in (["--help"], ["demo", "--help"], ["bench", "--help"]):
        done = run(str(venv / "bin" / "ecvl-fast"), *args)
        assert done.returncode == 0 and "Usage" in done.stdout, done.stderr[-2000:]


def test_make_setup_says_when_the_disk_is_too_small():
    # a fresh install fills about 7 GB; with less free, pip would fail halfway with a bare OSError
    make = lambda gb: subprocess.run(  # noqa: E731
        ["make", "--no-print-directory", "diskcheck", f"NEED_GB={gb}"],
        cwd=ROOT,  # noqa: E731
        capture_output=True,
        text=True,
        timeout=60,
    )
    short = make(10**9)
    assert short.returncode != 0
    assert (
        short.stderr.startswith("make setup: the install needs about 1000000000 GB free")
        and "GB are free" in short.stderr
    )
    assert make(0).returncode == 0
