"""A researcher's first hour: presets by name from anywhere, --version, --dry-run, the short flags,
one command from an image folder to a model, predict and the Python API, artifacts a person can
read, warnings that mean something, and the help text."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import write_tree
from ecvl_fast import EcvlError, __version__
from ecvl_fast.cli import main


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "ecvl_fast.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_version_presets_by_name_and_dry_run_from_outside_the_tree(tmp_path, mnist):
    """After an install the presets sit in site-packages: they are found by name from any folder.
    --dry-run prints the plan and writes nothing."""
    done = cli("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"ecvl-fast {__version__}"
    done = cli(
        "train", "--config", "cifar100-lt", "--dry-run", "--set", f"data.path={mnist}", "--out", "plan", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert 'name = "RN50-quickgelu"' in out and "10 classes" in out and "400 ... 4 train images per class" in out
    assert "stage 1, 50 epochs" in out and "stage 2, 300 epochs" in out and ": start;" in out
    assert "in all:" in out and not (tmp_path / "plan").exists()
    done = cli("ablate", "--config", "no-such-preset", cwd=tmp_path)
    assert (
        done.returncode == 2
        and "no such file or preset (presets: cifar100-lt, imagenet-lt, lift-cifar100-lt, "
        "lift-imagenet-lt, lift-places-lt, mnist-demo, places-lt, starter)"
        in done.stderr
    )


def test_short_flags_map_to_their_settings(tmp_path, mnist, capsys):
    args = [
        "--model",
        "ecvl-tiny-vit",
        "--epochs",
        "3",
        "--lr",
        "0.25",
        "--batch-size",
        "32",
        "--precision",
        "fp32",
        "--out",
        str(tmp_path / "o"),
        "--set",
        f"data.path={mnist}",
        "--dry-run",
    ]
    assert main(["train", "--stage", "2", *args]) == 2  # stage 2 alone: from a stage-1 run there is none of
    assert "--stage 2 starts from the stage-1 checkpoint" in capsys.readouterr().err
    assert main(["train", "--stage", "2", *args, "--set", "stage2.init=none"]) == 0  # from model.pretrained
    out = capsys.readouterr().out
    assert 'name = "ecvl-tiny-vit"' in out and "batch_size = 32" in out and 'precision = "fp32"' in out
    stage2 = out.split("[stage2]")[1].split("[")[0]
    assert "epochs = 3" in stage2 and "lr = 0.25" in stage2
    assert "epochs = 10" in out.split("[stage1]")[1].split("[")[0]  # --stage 2: stage 1 untouched
    assert f"stage 2, 3 epochs, {tmp_path / 'o' / 'stage2'}: start" in out
    assert main(["ablate", "--seeds", "0,1", "--rows", "ballad,ecvl", *args]) == 0
    out = capsys.readouterr().out
    assert out.count(": start;") == 6 and f"{tmp_path / 'o' / 'seed1' / 'ecvl'}" in out
    assert not (tmp_path / "o").exists()


def test_from_an_image_folder_to_a_model_and_a_prediction(tmp_path, monkeypatch, capsys, caplog):
    """The README's path: convert a folder, `train` (both stages, in a folder derived from the data
    and the model), predict, and the Python API on an exported model."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "mine"
    write_tree(root / "train", [40, 12, 4]), write_tree(root / "test", [3, 3, 3], seed=9)
    assert main(["convert", "folder", "--source", str(root), "--out", "data/mine"]) == 0
    out = capsys.readouterr().out
    assert "writing train.beton: 56 images" in out and "\r" not in out  # one line per phase, not bars
    assert (
        main(
            [
                "train",
                "--config",
                "starter",
                "--set",
                "data.path=data/mine",
                "--model",
                "ecvl-tiny-vit",
                "--set",
                "data.res=32",
                "--epochs",
                "1",
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "mine-ecvl-tiny-vit"
    assert f"stage 1: run folder {run.relative_to(tmp_path)}" in out
    assert f"stage 2 done: {(run / 'stage2').relative_to(tmp_path)}" in out
    for folder in (run, run / "stage2"):
        assert (folder / "metrics.json").is_file() and (folder / "curves.png").stat().st_size > 1000
        records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        assert records and all(r["kind"] in ("step", "epoch", "memory", "event") for r in records)
    saved = json.loads((run / "stage2" / "metrics.json").read_text())
    assert (saved["split"], saved["stage"], saved["run"], saved["units"]) == ("test", 2, run.name, "percent")
    assert saved["checkpoint"].endswith("stage2/last.pt") and list(saved["per_class"]) == ["c00", "c01", "c02"]
    assert 0 <= saved["all"] <= 100 and saved["all"] == pytest.approx(
        100 * sum(saved["per_class"][c] * n for c, n in zip(("c00", "c01", "c02"), (3, 3, 3))) / 900
    )
    memory = [r for r in records if r["kind"] == "memory"]
    assert memory and set(memory[-1]["m_by_group"]["medium"]) == {"p10", "p25", "p50", "p75", "p90", "seen"}
    caplog.clear()
    assert main(["export", "--ckpt", str(run / "stage2" / "best.pt"), "--out", "model.pt"]) == 0
    image = root / "test" / "c01" / "00004.png"
    assert main(["predict", "--ckpt", "model.pt", str(image), "--top-k", "5"]) == 0
    table = capsys.readouterr().out
    assert "top-3" in table and table.count("c0") >= 4  # all three classes listed: k = min(5, classes)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]  # weights are loaded
    from ecvl_fast.serving.classifier import load

    model = load("model.pt")
    preds = model.classify([image, Image.open(image)], top_k=2)
    assert model.classify(str(image), top_k=2)[0].classes == preds[0].classes  # one path, not a list
    assert model.classes == ["c00", "c01", "c02"] and [len(p.classes) for p in preds] == [2, 2]
    assert preds[0].classes == preds[1].classes and preds[0].probs == pytest.approx(preds[1].probs, abs=1e-6)
    assert main(["predict", "--ckpt", "model.pt", "no-such.png"]) == 2
    assert "no-such.png: no such image file" in capsys.readouterr().err


def test_warnings_that_mean_something():
    from ecvl_fast.config import ModelCfg
    from ecvl_fast.method.model import random_weights_warning

    assert "RN50 trains from random weights" in random_weights_warning(ModelCfg(name="RN50"))
    assert random_weights_warning(ModelCfg(name="RN50", pretrained="/w/rn50.pt")) is None
    assert random_weights_warning(ModelCfg(name="ecvl-tiny-vit")) is None  # made to train from scratch


def test_help_text(capsys):
    from ecvl_fast.experiments.presets import names
    from ecvl_fast.method.rows import ROWS

    assert main(["train", "--help"]) == 0
    words = set(capsys.readouterr().out.replace("│", " ").replace(",", " ").replace("(", " ").replace(")", " ").split())
    assert set(names()) <= words  # the list comes from the presets themselves
    assert main(["ablate", "--help"]) == 0
    words = set(capsys.readouterr().out.replace("│", " ").replace(",", " ").split())
    assert set(ROWS) <= words and "lift+freq" in words
    assert main(["export", "--help"]) == 0
    assert "ecvl-fast[onnx]" in capsys.readouterr().out
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "a TOML file or a preset" in out and "section.key=value" in out
    for dataset in ("cifar10-lt", "cifar100-lt"):
        assert main(["convert", dataset, "--out", "x"]) == 2
        assert "needs --source" in capsys.readouterr().err


def test_a_config_that_names_no_folder_gets_one_from_its_data_and_model():
    from ecvl_fast.config import load_config

    assert load_config(None, ["data.path=data/a"]).run.out == "runs/a-RN50"
    assert load_config(None, ["data.path=data/b", "model.name=ViT-B-16"]).run.out == "runs/b-ViT-B-16"
    assert load_config(None, ["run.out=mine", "data.path=data/b"]).run.out == "mine"
    from ecvl_fast.config import from_dict

    base = load_config(None, ["model.name=RN50"])  # `eval --data DIR`: the derived folder follows the data
    assert from_dict({"data": {"path": "data/places-lt"}}, "--data", base=base).run.out == "runs/places-lt-RN50"
    with pytest.raises(EcvlError, match="no such file or preset"):
        from ecvl_fast.experiments.presets import resolve

        resolve("data/nothing.toml")
