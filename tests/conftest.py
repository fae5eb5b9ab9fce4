"""Tiny generated datasets: fake CIFAR pickles, image trees and OLTR split files; two torchrun
agents acting as two nodes; finding a torchrun worker to kill."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ecvl_fast.bench.synthetic import fake_images, write_cifar10  # noqa: F401  (re-exported for tests)

# The longest modules first (about 1.5 to 3.5 min each on two cores): pytest-xdist's loadscope hands
# modules out in collection order, so the suite ends on short modules on both workers, not on one
# long module on one worker while the other idles (its last minutes before, 2026-12-06).
LONGEST = ("train", "as_written", "ablate", "paper_presets", "first_hour", "faults")


def pytest_collection_modifyitems(items):
    first = {f"test_{name}.py": i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: first.get(item.path.name, len(LONGEST)))  # stable: the rest keep their order


# A tiny CLIP on MNIST-LT for end-to-end tests (format with epochs and loss).
TINY = """
[data]
res = 32
batch_size = 64
workers = 1
[model]
name = "ecvl-tiny-vit"
[stage1]
epochs = {epochs}
loss = "{loss}"
lr = 2e-3
weight_decay = 0.05
warmup_epochs = 0.5
[run]
device = "cpu"
log_every = 5
"""


def write_tree(root: Path, counts: list[int], size: int = 24, seed: int = 0) -> list[Path]:
    paths, k = [], 0
    for c, n in enumerate(counts):
        d = root / f"c{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for img in fake_images(n, seed + c, size):
            p = d / f"{k:05d}.png"
            Image.fromarray(img).save(p)
            paths.append(p)
            k += 1
    return paths


@pytest.fixture(scope="session")
def mnist(tmp_path_factory):
    """The embedded MNIST-LT, converted once for the whole run (real digits, 988 train, 1,000 test)."""
    from ecvl_fast.loaders.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("data") / "mnist-lt"
    convert(ConvertOptions("mnist-lt", out, workers=1))
    return out


@pytest.fixture
def cifar10_dir(tmp_path):
    return write_cifar10(tmp_path / "cifar-10-batches-py")


@pytest.fixture
def split_dataset(tmp_path):
    """An OLTR-style root plus train/test split files over 3 classes."""
    root = tmp_path / "images"
    train = write_tree(root / "train", [30, 12, 5])
    test = write_tree(root / "test", [3, 3, 3], seed=10)

    def lines(paths):
        return "".join(f"{p.relative_to(root)} {int(p.parent.name[1:])}\n" for p in paths)

    (tmp_path / "train.txt").write_text(lines(train))
    (tmp_path / "test.txt").write_text(lines(test))
    return root, tmp_path / "train.txt", tmp_path / "test.txt"


def two_nodes(cli_args: list[str], port: int, cwds=(None, None)) -> list[tuple[int, str, str]]:
    """`ecvl-fast CLI_ARGS` under two torchrun agents, one process each, as node ranks 0 and 1 of a
    static rendezvous on 127.0.0.1 (gloo over loopback). (returncode, stdout, stderr) per node."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(r),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "ecvl_fast.cli",
                *cli_args,
            ],
            cwd=cwds[r],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def worker_pid(agent_pid: int, local_rank: int) -> int | None:
    """The pid of the torchrun worker with LOCAL_RANK=local_rank among the children of agent_pid."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(proc.name)
    return None
