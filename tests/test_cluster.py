"""A node that cannot see the run folder. (Two torchrun agents as two nodes matching one process:
test_train.py's DDP test.)"""

import time

from conftest import TINY, two_nodes


def config(tmp_path, mnist, epochs):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(epochs=epochs, loss="prompt-ce"))
    return path, [f"data.path={mnist}"]


def test_a_node_that_cannot_see_the_run_folder_gets_one_line(tmp_path, mnist):
    """Each node runs in its own directory with a relative run.out: rank 1's "runs/x" is not the
    folder rank 0 writes, as on a node-local disk."""
    path, sets = config(tmp_path, mnist, epochs=1)
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for c in cwds:
        c.mkdir()
    t0 = time.time()
    args = ["train", "--config", str(path)] + sum((["--set", s] for s in sets + ["run.out=runs/x"]), [])
    results = two_nodes(args, 29543, cwds)
    assert time.time() - t0 < 120  # no hang
    for code, _, err in results:
        assert code != 0
    lines = [line for _, _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert any("must be on a filesystem every node shares" in line and "rank 1" in line for line in lines), lines
    assert not (cwds[1] / "runs" / "x" / "last.pt").exists() and not (cwds[0] / "runs" / "x" / "last.pt").exists()
