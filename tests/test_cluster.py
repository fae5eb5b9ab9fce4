"""torchrun beyond one process: two agents acting as two nodes on 127.0.0.1, and a node that cannot
see the run folder. gloo, CPU processes."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY
from ecvl_fast import train as training
from ecvl_fast.config import load_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}  # loopback: the "nodes" are this machine


def config(tmp_path, mnist, epochs):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(epochs=epochs, loss="prompt-ce"))
    return path, [f"data.path={mnist}"]


def train_cmd(path, sets):
    return ["-m", "ecvl_fast.cli", "train", "--config", str(path)] + sum((["--set", s] for s in sets), [])


def epoch_losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def two_nodes(path, sets, port, cwds):
    """Two torchrun agents, one process each, rendezvous on 127.0.0.1: node ranks 0 and 1."""
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               *train_cmd(path, sets)], cwd=cwds[r], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def test_two_torchrun_agents_as_two_nodes_match_one_process(tmp_path, mnist):
    path, sets = config(tmp_path, mnist, epochs=1)
    single = training.main(load_config(path, sets + [f"run.out={tmp_path / 'single'}"]))
    results = two_nodes(path, sets + [f"run.out={tmp_path / 'nodes'}"], 29541, [tmp_path, tmp_path])
    for code, _, err in results:
        assert code == 0, err[-2000:]
    nodes = json.loads((tmp_path / "nodes" / "metrics.json").read_text())
    assert epoch_losses(tmp_path / "nodes")[0] == pytest.approx(epoch_losses(tmp_path / "single")[0], rel=1e-4)
    assert nodes["num_images"] == single["num_images"] and nodes["all"] == pytest.approx(single["all"], abs=0.01)
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in ("single", "nodes"))
    # The same weights after an epoch: same samples, same global batch, gradients averaged. Not the
    # attention's in_proj_bias: its key third gets zero gradient (softmax ignores a shift), and
    # Adam turns that zero's rounding noise into full-size steps of either sign.
    for k in a:
        if not k.endswith("in_proj_bias"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)


def test_a_node_that_cannot_see_the_run_folder_gets_one_line(tmp_path, mnist):
    """Each node runs in its own directory with a relative run.out: rank 1's "runs/x" is not the
    folder rank 0 writes, as on a node-local disk."""
    path, sets = config(tmp_path, mnist, epochs=1)
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for c in cwds:
        c.mkdir()
    t0 = time.time()
    results = two_nodes(path, sets + ["run.out=runs/x"], 29543, cwds)
    assert time.time() - t0 < 120  # no hang
    for code, _, err in results:
        assert code != 0
    lines = [line for _, _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert any("must be on a filesystem every node shares" in line and "rank 1" in line for line in lines), lines
    assert not (cwds[1] / "runs" / "x" / "last.pt").exists() and not (cwds[0] / "runs" / "x" / "last.pt").exists()
