"""Faults a user meets, black-box through the CLI: a run that diverges never saves a non-finite
state, one writer per run folder, broken checkpoints in one line, huge images, runs that would
train nothing, a full disk, Ctrl-C, a moved run folder, a model that collapsed."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, write_tree
from ecvl_fast import EcvlError
from ecvl_fast.cli import main
from ecvl_fast.config import load_config
from ecvl_fast.run.files import atomic_write
from ecvl_fast.run.lifecycle import EXIT_INTERRUPTED, RunLock


def tiny(tmp_path, mnist, name, *sets, epochs=1):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(epochs=epochs, loss="prompt-ce"))
    return ["train", "--config", str(path), "--set", f"data.path={mnist}", "--set", f"run.out={tmp_path / name}"] + sum(
        (["--set", s] for s in sets), []
    )


def one_line_error(args, capsys, code=2):
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist):
    """One finished stage-1 run (1 epoch): its folder and the command that made it."""
    tmp = tmp_path_factory.mktemp("finished")
    args = tiny(tmp, mnist, "run")
    assert main(args) == 0
    return tmp / "run", args


def test_settings_and_data_that_would_train_nothing_are_refused_before_any_work(tmp_path, mnist, capsys):
    for setting, says in (
        ("stage2.epochs=0", "stage2.epochs must be at least 1"),
        ("stage1.epochs=-3", "stage1.epochs must be at least 0"),
        ("stage1.lr=-1e-3", "stage1.lr must be a finite number greater than 0"),
        ("stage2.lr=nan", "stage2.lr must be a finite number greater than 0"),
        ("stage2.lr=inf", "stage2.lr must be a finite number greater than 0, not inf"),
        ("stage2.lr=1e400", "stage2.lr must be a finite number greater than 0, not inf"),
        ("data.batch_size=0", "data.batch_size must be at least 1"),
        ("data.batch_size=5000", "988 train images, fewer than one batch"),
    ):
        assert says in one_line_error(tiny(tmp_path, mnist, "none", setting), capsys), setting
    assert "--epochs: stage2.epochs must be at least 1, not 0" in one_line_error(  # the flag typed, not its key
        tiny(tmp_path, mnist, "none") + ["--epochs", "0"], capsys
    )
    assert "stage 1 trains ecvl-small-rn's BatchNorm layers, which need at least 2" in one_line_error(
        tiny(tmp_path, mnist, "none", "data.batch_size=1", "model.name=ecvl-small-rn"), capsys
    )
    assert "unknown open_clip model 'RN5O' (did you mean RN50" in one_line_error(
        tiny(tmp_path, mnist, "none", "model.name=RN5O"), capsys
    )
    assert not (tmp_path / "none").exists()  # a refused run leaves no empty folder behind
    # one class: nothing to tell apart
    root = tmp_path / "one"
    write_tree(root / "train", [6]), write_tree(root / "test", [2], seed=3)
    assert main(["convert", "folder", "--source", str(root), "--out", str(tmp_path / "one-data")]) == 0
    capsys.readouterr()
    assert "1 class; a classifier needs at least two" in one_line_error(
        tiny(tmp_path, tmp_path / "one-data", "one-run"), capsys
    )


def test_a_class_folder_linking_back_into_the_tree_is_refused(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_tree(root / "train", [4, 3]), write_tree(root / "test", [2, 2], seed=3)
    (root / "train" / "zz").symlink_to(root / "train")
    err = one_line_error(["convert", "folder", "--source", str(root), "--out", str(tmp_path / "d")], capsys)
    assert "zz: a class folder that links back into the image tree" in err
    assert not (tmp_path / "d").exists()


def test_a_diverged_run_resumes_from_a_healthy_checkpoint_with_a_lower_lr(tmp_path, mnist, capsys):
    """lr = 100 with a checkpoint every step: the run stops in one line, every file it left holds
    finite weights, and the same command with a lower lr finishes with finite metrics. The last
    finite checkpoint is no way back (its weights are finite and wrecked): the run resumes its newest
    healthy one, the one the loss went on well from, or starts over where there is none, and says which."""
    err = one_line_error(tiny(tmp_path, mnist, "nan", "stage1.lr=100", "run.checkpoint_every=1"), capsys)
    assert "non-finite" in err and "healthy" in err and "--restart" in err
    saved = list((tmp_path / "nan").glob("*.pt"))
    for path in saved:
        state = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path
    assert saved and not list((tmp_path / "nan").glob(".*.tmp"))
    assert main(tiny(tmp_path, mnist, "nan", "stage1.lr=2e-3", "run.checkpoint_every=1")) == 0
    out = capsys.readouterr().out
    healthy = (tmp_path / "nan" / "healthy.pt").is_file()
    assert (
        "diverged before any healthy checkpoint: starting over with stage1.lr (100.0 -> 0.002)" in out
        or "diverged: resuming its last healthy checkpoint (healthy.pt, epoch 1, step" in out
    ), out
    metrics = json.loads((tmp_path / "nan" / "metrics.json").read_text())
    assert np.isfinite(metrics["all"]) and np.isfinite(metrics["macro_f1"]) and healthy
    assert load_config(tmp_path / "nan" / "config.toml").stage1.lr == 2e-3


def test_a_checkpoint_is_healthy_when_the_loss_after_it_is():
    from ecvl_fast.run.lifecycle import healthy

    assert healthy(2.3, []) and healthy(2.0, [2.3, 2.1, 1.9]) and healthy(6.0, [2.3, 2.1, 1.9])
    assert not healthy(7.0, [2.3, 2.1, 1.9]) and not healthy(float("nan"), []) and not healthy(float("inf"), [1.0])


def test_predict_and_export_refuse_nonfinite_weights(tmp_path, finished, capsys):
    folder, _ = finished
    state = torch.load(folder / "last.pt", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name][0] = float("nan")
    bad = tmp_path / "diverged.pt"
    torch.save(state, bad)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(image)
    for args in (
        ["predict", "--ckpt", str(bad), str(image)],
        ["export", "--ckpt", str(bad), "--out", str(tmp_path / "e.pt")],
    ):
        err = one_line_error(args, capsys)
        assert f"non-finite weights (model.{name})" in err, err
    assert not (tmp_path / "e.pt").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_broken_checkpoints_are_one_line_naming_what_else_is_there(tmp_path, finished, capsys, damage):
    src, args = finished
    folder = tmp_path / "run"
    shutil.copytree(src, folder)
    last = folder / "last.pt"
    data = last.read_bytes()
    last.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    (folder / "metrics.json").unlink()  # an unfinished run: train must read last.pt to resume
    moved = [f"run.out={folder}" if a == f"run.out={src}" else a for a in args]
    for cmd in (moved, ["predict", "--ckpt", str(last), str(tmp_path)]):
        err = one_line_error(cmd, capsys)
        assert ("an empty file" if damage == "empty" else "truncated or foreign") in err
        assert str(folder / "best.pt") in err and "--restart" in err


def test_a_moved_run_folder_is_still_the_same_run(tmp_path, finished, capsys):
    src, args = finished
    shutil.copytree(src, tmp_path / "moved")
    assert main([f"run.out={tmp_path / 'moved'}" if a == f"run.out={src}" else a for a in args]) == 0
    assert "finished already" in capsys.readouterr().out


def test_one_writer_per_run_folder(tmp_path, mnist, capsys):
    """A second command into a folder a live run holds is refused at once, naming the holder; a
    lock left by a dead process, or by another node that stopped beating, is taken over."""
    args = tiny(tmp_path, mnist, "run", epochs=50)
    first = subprocess.Popen(
        [sys.executable, "-m", "ecvl_fast.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lock = tmp_path / "run" / ".lock"
    try:
        deadline = time.time() + 120
        while not lock.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert lock.exists(), first.stderr.read() if first.poll() is not None else "no lock"
        err = one_line_error(args, capsys)
        assert f"in use by pid {first.pid} on {socket.gethostname()}" in err
    finally:
        first.kill()
        first.wait()
    # the holder was killed: its lock is stale, taken over in one line
    with RunLock(tmp_path / "run"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(EcvlError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path / "run").__enter__()
    assert not lock.exists()  # released on exit
    assert "taking over a stale lock (pid" in capsys.readouterr().out
    # another node: fresh heartbeat -> refused; none for longer than STALE_S -> taken over
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(EcvlError, match="in use by pid 1 on elsewhere"):
        RunLock(tmp_path / "run").__enter__()
    old = time.time() - RunLock.STALE_S - 10
    os.utime(lock, (old, old))
    with RunLock(tmp_path / "run"):
        pass
    assert "no heartbeat for" in capsys.readouterr().out


def test_a_lock_naming_a_reused_pid_is_taken_over(tmp_path, finished, capsys):
    """A .lock naming a pid that runs on this host is not proof of a writer: a process started after
    the lock was taken reuses the pid. Through the CLI: the same command on a finished run takes
    such a lock over with one line, and leaves a lock its own live process holds alone."""
    src, args = finished
    folder = tmp_path / "run"
    shutil.copytree(src, folder)
    moved = [f"run.out={folder}" if a == f"run.out={src}" else a for a in args]
    sleeper = subprocess.Popen(["sleep", "60"])  # a live pid, started now
    try:
        days_ago = time.time() - 3 * 86400
        lock = folder / ".lock"
        lock.write_text(
            json.dumps(
                {
                    "pid": sleeper.pid,
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(days_ago)),
                }
            )
        )
        assert main(moved) == 0  # a fresh heartbeat, but the process is younger than the lock
        assert (
            f"taking over a stale lock (pid {sleeper.pid} runs, but started after the lock was taken: a reused "
            "pid)" in capsys.readouterr().out
        )
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": time.time()}))
        assert "in use by pid" in one_line_error(moved, capsys)  # alive, started before the lock: held
        os.utime(lock, (days_ago, days_ago))  # held still with an old heartbeat: a stopped (Ctrl-Z) writer
        assert "in use by pid" in one_line_error(moved, capsys)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_tampered_export_or_dataset_is_refused_in_one_line(tmp_path, finished, mnist, capsys):
    """Exports carry a digest of their tensors; a .beton is checked against meta.json's sha256 (hashed
    once, then its size and mtime), and `verify` hashes every split."""
    from ecvl_fast.serving.classifier import digest

    folder, _ = finished  # a ResNet's BatchNorm counters are 0-dim int64 tensors: digested too
    assert digest({"n": torch.tensor(3)}) != digest({"n": torch.tensor(4)}) != digest({"n": torch.tensor(4.0)})
    assert "/proc/m.pt: " in one_line_error(
        ["export", "--ckpt", str(folder / "best.pt"), "--out", "/proc/m.pt"], capsys
    )
    assert main(["export", "--ckpt", str(folder / "best.pt"), "--out", str(tmp_path / "m.pt")]) == 0
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(image)
    assert main(["predict", "--ckpt", str(tmp_path / "m.pt"), str(image)]) == 0
    assert "an exported classifier (ecvl-fast export), which predict and the Python API read" in one_line_error(
        ["eval", "--ckpt", str(tmp_path / "m.pt"), "--data", str(mnist)], capsys
    )
    raw = bytearray((tmp_path / "m.pt").read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 50] = bytes(255 - b for b in raw[middle : middle + 50])
    (tmp_path / "m.pt").write_bytes(bytes(raw))
    capsys.readouterr()
    assert "do not match the digest written at export" in one_line_error(
        ["predict", "--ckpt", str(tmp_path / "m.pt"), str(image)], capsys
    )
    data = tmp_path / "data"
    shutil.copytree(mnist, data)
    assert main(["verify", str(data)]) == 0 and "match meta.json's sha256" in capsys.readouterr().out
    beton = data / "train.beton"
    raw = bytearray(beton.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    beton.write_bytes(bytes(raw))  # same size: only the content changed (and the mtime)
    for args in (["verify", str(data)], tiny(tmp_path, data, "t")):
        assert "train.beton does not match the sha256 meta.json recorded" in one_line_error(args, capsys)


def test_config_toml_round_trips_hostile_strings(tmp_path, mnist, capsys):
    """Quotes, newlines and a fake section in a --set value stay a string: written by a TOML writer,
    read back as they were, and the dry run prints no injected key."""
    from ecvl_fast.config import config_toml

    hostile = str(tmp_path / 'a"b') + "\n[run]\nseed = 5\n\\ \u00e9"
    cfg = load_config(None, [f"run.out={hostile}", f"data.path={mnist}", "model.name=ecvl-tiny-vit", "data.res=32"])
    (tmp_path / "c.toml").write_text(config_toml(cfg))
    again = load_config(tmp_path / "c.toml")
    assert again == cfg and again.run.out == hostile and again.run.seed == 0
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "seed = 0" in out and "seed = 5\n" not in out.split("[run]")[1].split("out = ")[0]


def test_odd_inputs_that_used_to_get_through(tmp_path, finished, mnist, capsys):
    """A checkpoint whose class names are not the data's (same count), a torn last line in
    log.jsonl, 16-bit PNGs, an image over --max-pixels, a 250-character --out and a killed
    convert's temp folder."""
    src, args = finished
    data = tmp_path / "renamed"
    shutil.copytree(mnist, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["classes"][3] = "tree"
    (data / "meta.json").write_text(json.dumps(meta))
    err = one_line_error(["eval", "--ckpt", str(src / "last.pt"), "--data", str(data)], capsys)
    assert "class 3 is 'three' in the checkpoint and 'tree' in the data" in err
    folder = tmp_path / "torn"
    shutil.copytree(src, folder)
    with open(folder / "log.jsonl", "a") as f:
        f.write('{"time": "2026-12-05T10:00:00", "kind": "ste')  # a writer killed mid-line
    (folder / "metrics.json").unlink()  # the end of the run again: its report and plots
    assert main([f"run.out={folder}" if a == f"run.out={src}" else a for a in args]) == 0
    assert (folder / "metrics.json").is_file() and (folder / "curves.png").is_file()
    lines = (folder / "log.jsonl").read_text().splitlines()
    assert lines[-1].startswith("{") and json.loads(lines[-1])  # a new record starts on a line of its own
    # a 16-bit greyscale scan: scaled to 8 bits, not clipped to white
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (32, 1))
    root = tmp_path / "scans"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(ramp).save(root / split / c / "0.png")
    assert Image.open(root / "train" / "a" / "0.png").mode.startswith("I")
    name = "x" * 250  # a legal name, with no room to spare for a temp folder's suffix
    stale = tmp_path / f".{name[:100]}.tmp-99999999-killed"  # a killed convert's (no such pid)
    stale.mkdir()
    (stale / "train.beton").write_bytes(b"\0" * 4096)
    assert main(["convert", "folder", "--source", str(root), "--out", str(tmp_path / name)]) == 0
    assert f"removed {stale}, a killed convert's temp folder" in capsys.readouterr().out and not stale.exists()
    from ecvl_fast.loaders.ffcv_loader import make_loader

    images, _, _ = next(iter(make_loader(tmp_path / name / "train.beton", "sequential", 2, 64, workers=1)))
    want = np.round(ramp / 257)
    assert np.abs(images[0, :32, :64, 0].numpy() - want).max() <= 1 and images[0, :32, :64].numpy().max() == 255
    err = one_line_error(
        ["convert", "folder", "--source", str(root), "--out", str(tmp_path / "big"), "--max-pixels", "1000"], capsys
    )
    assert "64 x 32 = 0.0 megapixels, over --max-pixels 1,000" in err and "--skip-bad" in err


def test_eval_leaves_a_held_run_folder_alone_and_checks_its_folder_first(tmp_path, finished, capsys):
    """A running train holds its folder: eval's report goes where --out says. A folder the report
    cannot go to is one line before the evaluation, not after it."""
    src, _ = finished
    folder = tmp_path / "run"
    shutil.copytree(src, folder)
    (folder / ".lock").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time() - 5})
    )
    err = one_line_error(["eval", "--ckpt", str(folder / "last.pt")], capsys)
    assert f"is being written by a running train (pid {os.getpid()}" in err and "--out" in err
    assert not (folder / "eval-test").exists()
    assert "the report cannot be written there" in one_line_error(
        ["eval", "--ckpt", str(folder / "last.pt"), "--out", "/proc/ecvl-fast-report"], capsys
    )
    assert main(["eval", "--ckpt", str(folder / "last.pt"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "metrics.json").is_file()


def test_sigint_checkpoints_and_exits_130(tmp_path, mnist):
    from test_lifecycle import signal_mid_epoch

    args = tiny(tmp_path, mnist, "run", epochs=2)[1:]
    code, _, err = signal_mid_epoch(args, tmp_path / "run", 1, signal.SIGINT)
    assert code == EXIT_INTERRUPTED, err[-2000:]
    assert "stopped by SIGINT" in err and "run the same command to resume" in err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["position"]["step"] > 0
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_huge_image_is_shrunk_when_converted(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_tree(root / "train", [3, 3]), write_tree(root / "test", [1, 1], seed=3)
    Image.new("RGB", (8000, 8000), (200, 30, 30)).save(root / "train" / "c00" / "huge.png")
    assert main(["convert", "folder", "--source", str(root), "--out", str(tmp_path / "d")]) == 0
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["max_side"] == 512 and (tmp_path / "d" / "train.beton").stat().st_size < 20 * 2**20
    assert "1 images larger than 512 px on their longest side are shrunk" in capsys.readouterr().out
    (root / "train" / "c00" / "huge.png").unlink()
    assert main(["convert", "folder", "--source", str(root), "--out", str(tmp_path / "e"), "--max-res", "0"]) == 0
    assert json.loads((tmp_path / "e" / "meta.json").read_text())["max_side"] == 24  # 0 keeps every size


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous checkpoint")

    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(EcvlError, match=r"no space left on the device\); the previous file is intact"):
        atomic_write(target, full)
    assert target.read_bytes() == b"the previous checkpoint" and not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_for_real(tmp_path, mnist, capsys):
    """On a 1 MB tmpfs (where the test may mount one): training stops in one line, saying so."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = tmp_path / "t.toml"
        path.write_text(TINY.format(epochs=1, loss="prompt-ce"))
        err = one_line_error(
            ["train", "--config", str(path), "--set", f"data.path={mnist}", "--set", f"run.out={mnt / 'run'}"], capsys
        )
        assert "no space left" in err
        assert not list((mnt / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)])


def test_metrics_files_keep_every_class_and_refuse_an_old_format(tmp_path):
    from ecvl_fast.evaluation.reports import metrics_file, read_metrics

    metrics = {
        "many": 0.5,
        "medium": None,
        "few": 0.25,
        "all": 0.4,
        "macro_f1": 0.3,
        "head_tail_gap": 0.25,
        "per_class": [0.5, 0.25, 1.0],
        "num_images": 9,
        "predicted_classes": 3,
    }
    saved = metrics_file(metrics, ["missile", "cat", "missile"], {"split": "test"})  # ImageNet names a class twice
    assert list(saved["per_class"]) == ["missile (0)", "cat", "missile (2)"]
    (tmp_path / "metrics.json").write_text(json.dumps(saved))
    assert read_metrics(tmp_path / "metrics.json")["per_class"] == pytest.approx([0.5, 0.25, 1.0])
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))  # fractions, as an older version wrote
    with pytest.raises(EcvlError, match="written by an older ecvl-fast"):
        read_metrics(tmp_path / "metrics.json")


def test_a_stage2_setting_never_refuses_a_stage1_folder():
    """`train` runs stage 1 then 2: lowering stage2.lr after stage 2 diverged must not make stage 1
    refuse its own (finished) folder."""
    from ecvl_fast.run.lifecycle import config_diff

    old, new = load_config(None, ["stage2.lr=1e-3"]).to_dict(), load_config(None, ["stage2.lr=1e-4"]).to_dict()
    assert config_diff(old, new, stage=1) == [] and config_diff(old, new, stage=2) == ["stage2.lr (0.001 -> 0.0001)"]


def test_collapsed_predictions_are_warned_about(capsys):
    from ecvl_fast.training.loop import warn_if_collapsed

    warn_if_collapsed({"predicted_classes": 1}, 10, "test")
    assert "falls on 1 of 10 classes: the model has collapsed" in capsys.readouterr().err
    warn_if_collapsed({"predicted_classes": 7}, 10, "test")
    warn_if_collapsed({"predicted_classes": 2}, 2, "test")
    assert capsys.readouterr().err == ""


def test_a_dataset_that_cannot_be_written_to_is_stamped_in_the_cache(tmp_path, mnist, monkeypatch):
    """Hashed once even where the data folder refuses the stamp (a shared, read-only dataset): the
    stamp goes to the user's cache, and the next open reads it there."""
    from ecvl_fast.loaders.convert import load_meta
    from ecvl_fast.run import files
    from ecvl_fast.training import data as data_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real, data = files.atomic_write, tmp_path / "data"
    shutil.copytree(mnist, data)

    def refuse_beside_data(path, write):
        if Path(path).parent == data:
            raise EcvlError(f"{path}: could not write it (permission denied)")
        real(path, write)

    monkeypatch.setattr(data_mod, "atomic_write", refuse_beside_data)
    meta = load_meta(data)
    (data / data_mod.STAMP).unlink(missing_ok=True)
    assert set(data_mod.verify(data, meta).values()) == {"hashed"}
    assert list((tmp_path / "cache" / "ecvl-fast").glob("verified-*.json")) and not (data / data_mod.STAMP).exists()
    assert set(data_mod.verify(data, meta).values()) == {"stamped"}
