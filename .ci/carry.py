"""The wheels the device check carries to the offline GPU machine (`.ci/gpu-carry.txt`).

  carry.py download DEST --python 3.12 --torchvision 0.26.0   wheels for that Python (x86_64 manylinux)
  carry.py install WHEELS TARGET [--leave-out NAME ...]     what this Python lacks, --no-deps, into TARGET
  carry.py compare DIR_A DIR_B                               the same names in two wheel sets, what differs

`install` runs under the Python that will use the wheels and skips every distribution that
Python already has (the machine's own torchvision, pillow, ...), so carried wheels never
shadow a build matched to the machine's torch. Standard library only: it runs before anything
is installed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LIST = Path(__file__).with_name("gpu-carry.txt")
# Installed even where the machine has a copy: `pip install -e . --no-build-isolation` builds with
# whatever setuptools is importable, and one older than 70.1 has no bdist_wheel without `wheel`
# (the rehearsal's fresh venv failed exactly so).
ALWAYS = {"setuptools"}
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def requirements(torchvision: str) -> list[str]:
    reqs = [line.split("#")[0].strip() for line in LIST.read_text().splitlines()]
    return [f"torchvision=={torchvision}" if r == "TORCHVISION" else r for r in reqs if r]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels(folder: Path) -> dict[str, tuple[str, str]]:
    """canonical name -> (version, tags) of every wheel in `folder`."""
    out = {}
    for w in sorted(folder.glob("*.whl")):
        name, version, *rest = w.name[:-4].split("-")
        out[canonical(name)] = (version, "-".join(rest))
    return out


def download(dest: Path, python: str, torchvision: str) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "-d",
        str(dest),
    ] + sum((["--platform", p] for p in PLATFORMS), [])
    return subprocess.call(cmd + requirements(torchvision))


def install(folder: Path, target: Path, leave_out: list[str]) -> int:
    skip = {canonical(n) for n in leave_out}
    todo = []
    for w in sorted(folder.glob("*.whl")):
        name = canonical(w.name.split("-")[0])
        if name in skip:
            print(f"carry: leaving out {name} (as asked)")
            continue
        if name in ALWAYS:
            todo.append(str(w))
            continue
        try:
            print(f"carry: {name} {metadata.version(name)} is here already; not installing {w.name}")
            continue
        except metadata.PackageNotFoundError:
            todo.append(str(w))
    if not todo:
        return 0
    print(f"carry: installing {len(todo)} wheels into {target}")
    return subprocess.call(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(target),
        ]
        + todo
    )


def compare(a: Path, b: Path) -> int:
    wa, wb = wheels(a), wheels(b)
    same = 0
    for name in sorted(set(wa) | set(wb)):
        va, vb = wa.get(name), wb.get(name)
        if va == vb:
            same += 1
        else:
            print(
                f"  {name:18s} {a.name}: {'-'.join(va) if va else 'missing':40s} "
                f"{b.name}: {'-'.join(vb) if vb else 'missing'}"
            )
    print(f"  {same} wheels identical in both sets (pure Python, or one ABI-independent build)")
    return 0 if set(wa) == set(wb) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download")
    d.add_argument("dest", type=Path)
    d.add_argument("--python", required=True)
    d.add_argument("--torchvision", required=True)
    i = sub.add_parser("install")
    i.add_argument("wheels", type=Path)
    i.add_argument("target", type=Path)
    i.add_argument("--leave-out", nargs="*", default=[])
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = p.parse_args()
    if a.cmd == "download":
        return download(a.dest, a.python, a.torchvision)
    if a.cmd == "install":
        return install(a.wheels, a.target, a.leave_out)
    return compare(a.a, a.b)


if __name__ == "__main__":
    sys.exit(main())
