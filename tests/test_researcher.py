"""A researcher's day: progress on screen and in a batch log, the dry run's time estimate, a quick
trial, best.pt by a chosen val metric and the report on it, the artifacts (percent everywhere,
summary.csv, the confusion matrix, top-5, precision and recall, the trackers), and weights that
cannot be fetched."""

import csv
import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY
from ecvl_fast.cli import main
from ecvl_fast.config import load_config


@pytest.fixture(scope="module")
def with_val(tmp_path_factory, mnist):
    """MNIST-LT with a val split (the test file again: these tests read how val is used, not what it says)."""
    data = tmp_path_factory.mktemp("val") / "mnist-val"
    shutil.copytree(mnist, data)
    shutil.copy(data / "test.beton", data / "val.beton")
    meta = json.loads((data / "meta.json").read_text())
    meta["images"]["val"] = meta["images"]["test"]
    meta["sha256"]["val.beton"] = meta["sha256"]["test.beton"]
    (data / "meta.json").write_text(json.dumps(meta))
    return data


def tiny(tmp_path, data, out, *sets):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(epochs=2, loss="prompt-ce") + "[stage2]\nepochs = 3\nlr = 1e-2\n")
    return ["--config", str(path), "--set", f"data.path={data}", "--out", str(tmp_path / out)] + sum(
        (["--set", s] for s in sets), []
    )


def wandb_history(folder) -> list[dict]:
    """The scalars an offline W&B run logged, read from its run-*.wandb file: a LevelDB-style log
    (32 KiB blocks of records, each a 7-byte header: crc32, length, type) after a 7-byte file
    header, each record a wandb_internal Record protobuf."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb"))
    raw, pos, part, records = open(path, "rb").read(), 7, b"", []
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's zero padding
            pos += left
            continue
        part, pos = part + raw[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or a record's last piece
            records.append(part)
            part = b""
    history = []
    for data in records:
        r = wandb_internal_pb2.Record()
        r.ParseFromString(data)
        if r.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return history


def test_a_day_of_stage_two_best_on_few_reported_with_every_artifact(tmp_path, with_val, capsys, monkeypatch):
    """Stage 2 from random encoders, best.pt chosen by val few-shot accuracy and reported, both
    trackers, three progress lines per epoch in a piped log."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = tiny(
        tmp_path,
        with_val,
        "day",
        "stage2.init=none",
        "run.best_metric=few",
        "run.report=best",
        "run.report_to=all",
        "run.lines_per_epoch=3",
    )
    assert main(["train", "--stage", "2", *args]) == 0
    out, run = capsys.readouterr().out, tmp_path / "day" / "stage2"
    # progress: a line every 5 of 15 steps (timm's form) and the epoch line, each epoch
    for epoch in (1, 2, 3):
        for step in (5, 10, 15):
            line = next(x for x in out.splitlines() if f"epoch {epoch}/3 [{step:>2}/15 (" in x)
            assert " loss " in line and " lr " in line and " img/s data " in line and "% stage ETA " in line
        assert sum(f"stage 2 epoch {epoch}/3 loss " in x and " val " in x for x in out.splitlines()) == 1
    # units: percent in the log, summary.csv and metrics.json alike
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["kind"] == "epoch"]
    assert len(epochs) == 3 and all(r["units"] == "percent" for r in epochs)
    assert any(r["val_all"] > 1 for r in epochs) and all(0 <= r["val_all"] <= 100 for r in epochs)
    with open(run / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == [
        "epoch",
        "train_loss",
        "lr",
        "img_s",
        "val_all",
        "val_many",
        "val_medium",
        "val_few",
        "val_macro_f1",
    ]
    for r, e in zip(rows, epochs):
        assert float(r["val_few"]) == pytest.approx(e["val_groups"]["few"], rel=1e-5)
        assert float(r["lr"]) == pytest.approx(e["lr"], rel=1e-5)
    # best.pt: the epoch with the best val few-shot accuracy (the first of equals), and what the report evaluated
    few = [e["val_groups"]["few"] for e in epochs]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_metric"] == "few" and metrics["report"] == "best"
    assert metrics["best_epoch"] == 1 + int(np.argmax(few)) and metrics["checkpoint"] == str(run / "best.pt")
    assert f"(best.pt, epoch {metrics['best_epoch']})" in out
    assert main(["eval", "--ckpt", str(run / "best.pt"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["all"] == pytest.approx(metrics["all"]) and again["few"] == pytest.approx(metrics["few"])
    # top-5, precision and recall, the confusion matrix (counts, in class order) and its plot
    assert metrics["all"] <= metrics["top5"] <= 100 and again["top5"] == pytest.approx(metrics["top5"])
    with open(run / "confusion.csv") as f:
        table = list(csv.reader(f))
    names = table[0][1:]
    cm = np.array([[int(v) for v in row[1:]] for row in table[1:]])
    assert names == list(metrics["per_class"]) and cm.sum() == metrics["num_images"] == 1000
    recall = 100 * np.diag(cm) / cm.sum(1)
    assert recall == pytest.approx([metrics["per_class_recall"][n] for n in names])
    assert recall == pytest.approx([metrics["per_class"][n] for n in names])
    predicted = cm.sum(0)
    for i, n in enumerate(names):
        want = None if predicted[i] == 0 else pytest.approx(100 * cm[i, i] / predicted[i])
        assert metrics["per_class_precision"][n] == want
    for png in ("confusion.png", "per_class.png", "curves.png", "m_by_group.png"):
        assert (run / png).stat().st_size > 1000, png
    # the trackers: TensorBoard and W&B (offline) got the same scalars, the val groups in percent
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss", "lr", "img_s", "train_loss", "val_all", "val_many", "val_few", "M_few/p50", "M_many/p90"):
        assert f"stage2/{tag}" in tags, (tag, sorted(tags))
    assert [e.step for e in events.Scalars("stage2/loss")] == list(range(5, 46, 5))  # log_every = 5
    assert [e.value for e in events.Scalars("stage2/val_few")] == pytest.approx(few)
    history = wandb_history(run)
    assert [h["stage2/val_few"] for h in history if "stage2/val_few" in h] == pytest.approx(few)
    assert {"stage2/loss", "stage2/lr", "stage2/img_s", "stage2/M_few/p50"} <= set().union(*history)
    # the same finished run, asked for the last checkpoint's report: evaluated again, not reused
    assert main(["train", "--stage", "2", *args, "--set", "run.report=last"]) == 0
    last = json.loads((run / "metrics.json").read_text())
    assert last["report"] == "last" and last["checkpoint"] == str(run / "last.pt")
    assert "finished already" not in capsys.readouterr().out


def test_top5_names_five_classes_best_first_whatever_the_ties():
    import torch

    from ecvl_fast.evaluation.metrics import _best, ranked

    logits = np.round(np.random.default_rng(0).normal(size=(500, 12)) * 2) / 2  # many equal logits
    for top in (ranked(logits), _best(torch.tensor(logits), 5).numpy()):
        assert (top[:, 0] == logits.argmax(1)).all() and all(len(set(row)) == 5 for row in top)
        fifth = np.sort(logits, 1)[:, -5]
        assert (np.take_along_axis(logits, top, 1).min(1) >= fifth).all()  # the five best logits


def test_a_terminal_gets_a_bar_per_epoch_that_stays(tmp_path, capsys):
    """On a terminal: one bar per epoch, left on screen, counting images, with the loss, the data
    time and the stage's ETA; the epoch line after it."""
    from ecvl_fast.run.logs import RunLog

    log = RunLog(tmp_path, True, epochs=2, stage=1, interactive=True)
    for epoch in range(2):
        progress = log.progress(list(range(4)), epoch, 0, batch=8)
        for step, _ in enumerate(progress):
            progress.show(step, 1.5 - epoch, 1e-3, 100.0)
        log.epoch_end(epoch, {"train_loss": 1.0, "img_s": 100.0}, 1e-3, None, 4, 8)
    err, out = capsys.readouterr()[::-1]
    bars = [x for x in err.replace("\r", "\n").splitlines() if "stage 1 epoch" in x]
    finals = [b for b in bars if "32/32" in b]
    assert {b.split(":")[0] for b in finals} == {"stage 1 epoch 1/2", "stage 1 epoch 2/2"}
    assert all("img/s" in b and "loss " in b and "stage ETA" in b and "data" in b for b in finals)
    assert err.count("\n") >= 2  # each bar stays: closed with its own line
    assert out.count("stage 1 epoch") == 2 and (tmp_path / "summary.csv").is_file()


def test_trial_dry_run_estimate_and_refusals(tmp_path, mnist, with_val, capsys):
    """--trial: every stage in a minute, into its own folder; --dry-run says how long, as an
    estimate; best.pt by a shot group the data lacks, or a tracker not installed: one line."""
    args = tiny(tmp_path, mnist, "real")
    assert main(["train", *args, "--trial", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 steps per epoch at batch 64" in out and "limit_steps = 3" in out
    line = next(x for x in out.splitlines() if x.startswith("in all:"))
    assert "of training in one process on this machine (an estimate: 2 steps of 8 images timed on cpu" in line
    for stage in (1, 2):
        assert f"stage {stage}, 2 epochs, {tmp_path / 'real-trial'}" in out
    assert main(["train", *args, "--trial"]) == 0
    capsys.readouterr()
    assert not (tmp_path / "real").exists()
    for folder in (tmp_path / "real-trial", tmp_path / "real-trial" / "stage2"):
        log = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in log if r["kind"] == "step") == 6  # 2 epochs of 3 steps
        assert [r["lr"] for r in log if r["kind"] == "step"][-1] < 1e-6  # the schedule fits the trial's steps
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["trial"] is True and metrics["num_images"] == 64 and metrics["epochs"] == 2
        assert metrics["best_metric"] is None  # no val split: best.pt is the last epoch's
    # a tracker that is not installed: refused before any work, leaving nothing behind
    sys.modules["wandb"] = None  # as if not installed
    try:
        assert (
            main(["train", "--stage", "2", *tiny(tmp_path, mnist, "nowb", "stage2.init=none", "run.report_to=wandb")])
            == 2
        )
    finally:
        del sys.modules["wandb"]
    assert (
        "run.report_to = \"wandb\" needs the wandb package: pip install 'ecvl-fast[wandb]'" in capsys.readouterr().err
    )
    assert not (tmp_path / "nowb").exists()


def test_best_metric_needs_its_shot_group_and_the_old_tensorboard_switch_reads(tmp_path, with_val, capsys):
    meta = json.loads((with_val / "meta.json").read_text())
    data = tmp_path / "no-medium"
    shutil.copytree(with_val, data)
    meta["groups"] = {**meta["groups"], "many": meta["groups"]["many"] + meta["groups"]["medium"], "medium": []}
    (data / "meta.json").write_text(json.dumps(meta))
    assert main(["train", *tiny(tmp_path, data, "m", "run.best_metric=medium")]) == 2
    assert "run.best_metric = 'medium': " in capsys.readouterr().err and not (tmp_path / "m").exists()
    old = tmp_path / "old.toml"
    old.write_text("[run]\ntensorboard = true\n")
    assert load_config(old).run.report_to == "tensorboard"


def test_weights_that_cannot_be_fetched_are_one_line_at_once(tmp_path, mnist):
    """A LIFT preset asks for OpenAI's weights: with no network (or the hub offline) it says so at
    once, with the way out, and leaves no folder behind."""
    base = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ecvl_fast.cli",
                "train",
                "--config",
                "lift-cifar100-lt",
                "--set",
                f"data.path={mnist}",
                "--set",
                "run.device=cpu",
                "--out",
                str(tmp_path / "lift"),
            ],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        (line,) = done.stderr.strip().splitlines()
        assert "model.pretrained = 'openai': ViT-B-16-quickgelu's weights are not in the local cache" in line
        assert "--set model.pretrained=/path/to/weights" in line
        assert ("HF_HUB_OFFLINE" in line) == ("HF_HUB_OFFLINE" in env)
        assert not (tmp_path / "lift").exists()
