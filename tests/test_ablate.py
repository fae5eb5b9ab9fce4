"""`ecvl-fast pretrain` and `ecvl-fast ablate`: rows, seeds, ablation.json, resuming, presets."""

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from ecvl_fast import EcvlError
from ecvl_fast.training import loop as training
from ecvl_fast.experiments.ablate import last_val, paired, parse_seeds
from ecvl_fast.method.rows import parse_rows
from ecvl_fast.cli import main
from ecvl_fast.config import load_config
from ecvl_fast.evaluation.reports import metrics_file, read_metrics

from conftest import TINY as TINY_STAGE1

TINY = (
    TINY_STAGE1.format(epochs=1, loss="prompt-ce")
    + """
[stage2]
epochs = 2
lr = 1e-2
"""
)


def test_pretrain_writes_weights_open_clip_loads(tmp_path, mnist):
    import open_clip

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    weights = tmp_path / "w" / "tiny.pt"
    assert (
        main(
            [
                "pretrain",
                "--config",
                str(cfg),
                "--weights",
                str(weights),
                "--set",
                f"data.path={mnist}",
                "--set",
                f"run.out={tmp_path / 'pre'}",
            ]
        )
        == 0
    )
    model = open_clip.create_model("ecvl-tiny-vit", pretrained=str(weights))
    trained = torch.load(tmp_path / "pre" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, trained["clip." + k]) for k, v in model.state_dict().items())
    assert not list(weights.parent.glob(".*.tmp"))


def test_ablate_rows_seeds_json_and_resume(tmp_path, mnist, monkeypatch, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    weights = tmp_path / "tiny.pt"
    assert (
        main(
            [
                "pretrain",
                "--config",
                str(cfg),
                "--weights",
                str(weights),
                "--set",
                f"data.path={mnist}",
                "--set",
                f"run.out={tmp_path / 'pre'}",
            ]
        )
        == 0
    )
    out = tmp_path / "abl"
    # `ecvl-fast demo` is the ablation with a config file: run it first, then `ablate` on the same rows
    demo_cfg = tmp_path / "demo.toml"
    demo_cfg.write_text(TINY.replace('name = "ecvl-tiny-vit"', f'name = "ecvl-tiny-vit"\npretrained = "{weights}"'))
    assert main(["demo", "--config", str(demo_cfg), "--data", str(mnist), "--out", str(out), "--seeds", "0,1"]) == 0
    args = [
        "ablate",
        "--config",
        str(cfg),
        "--seeds",
        "0,1",
        "--set",
        f"data.path={mnist}",
        "--set",
        f"run.out={out}",
        "--pretrained",
        str(weights),
    ]
    result = json.loads((out / "ablation.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["zero-shot", "stage1", "ballad", "momentum", "ecvl"]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["ecvl"]["seeds"] == [0, 1] and len(rows["ecvl"]["per_seed"][0]["per_class"]) == 10
    alls = [m["all"] for m in rows["ecvl"]["per_seed"]]
    assert rows["ecvl"]["all"]["mean"] == pytest.approx(sum(alls) / 2)
    assert rows["ecvl"]["all"]["std"] == pytest.approx(abs(alls[0] - alls[1]) / 2**0.5)
    assert alls[0] != alls[1]  # the seed reaches the model and the data order
    assert (out / "ablation.png").stat().st_size > 1000
    # The rows differ as stated: BALLAD leaves the bank empty; + momentum fills it, RA off; ECVL uses it.
    cfgs = {n: load_config(out / "seed0" / n / "config.toml").stage2 for n in ("ballad", "momentum", "ecvl")}
    assert (cfgs["ballad"].dcvl_weight, cfgs["ballad"].randaug) == (0.0, False)
    assert (cfgs["momentum"].dcvl_weight, cfgs["momentum"].randaug) == (1.0, False)
    assert cfgs["ecvl"].randaug is True
    bank = {n: torch.load(out / "seed0" / n / "last.pt", weights_only=True)["momentum"] for n in cfgs}
    assert bank["ballad"]["seen"].sum() == 0 and bank["momentum"]["seen"].sum() > 500
    ecvl_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│ ECVL ")]
    assert len(ecvl_lines) == 2 and "BALLAD" in ecvl_lines[1]  # its row, then its difference from BALLAD
    # Every row is finished: `ablate` with the same settings trains nothing and prints the same table.
    monkeypatch.setattr(training, "main", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert main(args) == 0 and sum(line.startswith("│ ECVL ") for line in capsys.readouterr().out.splitlines()) == 2
    assert json.loads((out / "ablation.json").read_text())["rows"] == result["rows"]
    # A changed stage-2 setting retrains the stage-2 rows only, not stage 1.
    calls = []
    monkeypatch.setattr(
        training,
        "main",
        lambda cfg, stage=1, out=None, **k: calls.append(stage) or read_metrics(Path(out) / "metrics.json"),
    )
    assert main(args + ["--set", "stage2.temperature=0.1"]) == 0
    assert calls == [2, 2, 2, 2, 2, 2]
    # --rows: only the rows named, on the same stage-1 encoders; finished rows (BALLAD) are reused
    monkeypatch.undo()
    trained, real = [], training.main
    monkeypatch.setattr(
        training,
        "main",
        lambda cfg, stage=1, out=None, **k: (
            trained.append((stage, out and Path(out).name)) or real(cfg, stage, out, **k)
        ),
    )
    rows_args = [
        "ablate",
        "--config",
        str(cfg),
        "--seeds",
        "0",
        "--set",
        f"data.path={mnist}",
        "--set",
        f"run.out={out}",
        "--pretrained",
        str(weights),
        "--rows",
        "ballad,ecvl-ce-class",
    ]
    assert main(rows_args) == 0
    assert trained == [(2, "ecvl-ce-class")]
    result = json.loads((out / "ablation.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["zero-shot", "stage1", "ballad", "ecvl-ce-class"]
    aug = {n: load_config(out / "seed0" / n / "config.toml").aug for n in ("ballad", "ecvl-ce-class")}
    assert (aug["ecvl-ce-class"].m_source, aug["ecvl-ce-class"].m_scope) == ("ce", "class")
    assert aug["ballad"].m_source == "dcvl"
    per_seed = {r["name"]: r["per_seed"][0] for r in result["rows"]}
    (e,) = result["paired"]  # its control did not run
    assert (e["row"], e["against"]) == ("ecvl-ce-class", "ballad")
    assert e["few"]["per_seed"] == [per_seed["ecvl-ce-class"]["few"] - per_seed["ballad"]["few"]]
    # what the row put in M: one M per class, from the CE memory, ranked over the classes
    from ecvl_fast.training.data import open_dataset

    labels = np.asarray(open_dataset(mnist)["train_labels"])
    m = torch.load(out / "seed0" / "ecvl-ce-class" / "last.pt", weights_only=True)["momentum"]["m"].numpy()
    per_class = np.array([m[labels == c].mean() for c in range(10)])
    assert all(np.ptp(m[labels == c]) == 0 for c in range(10)) and np.ptp(per_class) == 1.0


def test_seed_and_row_lists_are_checked():
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "a,b", "1,1"):
        with pytest.raises(EcvlError, match="--seeds"):
            parse_seeds(bad)
    assert parse_rows("ballad, ecvl+") == ("ballad", "ecvl+")
    for bad in ("", "ballad,ballad", "ecvl,balad"):
        with pytest.raises(EcvlError, match="--rows"):
            parse_rows(bad)


def test_paired_differences_by_seed_against_ballad_and_both_controls():
    few = {
        "ballad": [0.10, 0.20],
        "ecvl-ce-class": [0.13, 0.21],
        "freq-rare": [0.12, 0.25],
        "freq-common": [0.09, 0.18],
        "ballad+ce-class": [0.11, 0.22],
        "ballad+freq-rare": [0.10, 0.20],
    }
    per_seed = {
        row: {s: {"few": v, "macro_f1": v / 2, "all": v * 2} for s, v in zip((0, 1), vals)} for row, vals in few.items()
    }
    pairs = {(e["row"], e["against"]): e for e in paired(per_seed, [0, 1])}
    assert set(pairs) == {(r, "ballad") for r in few if r != "ballad"} | {
        ("ecvl-ce-class", "freq-rare"),
        ("ecvl-ce-class", "freq-common"),
        ("ballad+ce-class", "ballad+freq-rare"),
    }
    e = pairs["ecvl-ce-class", "freq-rare"]
    assert e["few"]["per_seed"] == pytest.approx([0.01, -0.04])
    assert e["few"]["mean"] == pytest.approx(-0.015) and e["few"]["std"] == pytest.approx(0.05 / 2**0.5)
    assert pairs["ballad+ce-class", "ballad"]["all"]["per_seed"] == pytest.approx([0.02, 0.04])


def test_last_val_reads_the_last_scored_epoch(tmp_path):
    records = [
        {"epoch": 1, "val_all": 0.2, "val_groups": {"many": 0.3, "few": 0.1}, "val_macro_f1": 0.15},
        {"epoch": 2, "val_all": 0.4, "val_groups": {"many": 0.5, "few": 0.2}, "val_macro_f1": 0.35},
        {"epoch": 2, "m_by_group": {}},
        {"time": "t", "event": "finished"},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert last_val(tmp_path) == {"all": 0.4, "many": 0.5, "few": 0.2, "macro_f1": 0.35}
    assert last_val(tmp_path / "elsewhere") is None


def test_every_preset_loads_and_a_row_is_its_recipe(tmp_path, capsys):
    """Each packaged preset loads; one that names a recipe has exactly that recipe's row settings,
    which `ablate --rows NAME` applies too, so `--rows lift` and `--config lift-*` are one LIFT; a
    preset that changes its recipe's row is refused; --dry-run says where each value came from."""
    import ecvl_fast
    from ecvl_fast.experiments.ablate import _stage2_cfg
    from ecvl_fast.recipes import RECIPES

    presets = sorted((Path(ecvl_fast.__file__).parent / "configs").glob("*.toml"))
    assert {p.stem for p in presets} >= {
        "cifar100-lt",
        "imagenet-lt",
        "places-lt",
        "mnist-demo",
        "starter",
        "lift-cifar100-lt",
        "lift-imagenet-lt",
        "lift-places-lt",
    }
    named = {}
    for p in presets:
        cfg = load_config(p)
        recipe = tomllib.loads(p.read_text()).get("recipe")
        if recipe is None:
            continue
        named[p.stem] = recipe
        as_row = _stage2_cfg(load_config(None, [f"model.name={cfg.model.name}"]), recipe)  # the row on defaults
        for section, keys in RECIPES[recipe].row.items():
            for key, value in keys.items():
                assert getattr(getattr(cfg, section), key) == value == getattr(getattr(as_row, section), key), (
                    p.stem,
                    section,
                    key,
                )
        assert cfg.data.path == f"data/{p.stem.removeprefix('lift-')}"
        if recipe == "lift":  # LIFT's published schedule: one stage from CLIP ViT-B/16
            assert (
                cfg.model.name,
                cfg.model.pretrained,
                cfg.stage1.epochs,
                cfg.stage2.epochs,
                cfg.data.batch_size,
            ) == ("ViT-B-16-quickgelu", "openai", 0, 10, 128)
        else:
            assert (cfg.model.name, cfg.model.pretrained, cfg.stage2.epochs) == ("RN50-quickgelu", "openai", 300)
    assert named == {
        "cifar100-lt": "ecvl",
        "imagenet-lt": "ecvl",
        "places-lt": "ecvl",
        "lift-cifar100-lt": "lift",
        "lift-imagenet-lt": "lift",
        "lift-places-lt": "lift",
    }
    own = tmp_path / "mine.toml"
    own.write_text('recipe = "lift"\ndataset = "places-lt"\n[stage2]\nlr = 0.5\n')
    with pytest.raises(EcvlError, match="sets stage2.lr, which recipe 'lift' declares"):
        load_config(own)
    own.write_text('recipe = "lift"\ndataset = "places-lt"\n[stage2]\nepochs = 3\n')
    origins = {}
    cfg = load_config(own, ["stage2.lr=0.5", ("--batch-size", "data.batch_size=8")], origins)
    assert (cfg.stage2.lr, cfg.stage2.epochs, cfg.data.batch_size, cfg.data.path) == (0.5, 3, 8, "data/places-lt")
    assert (
        origins["stage2", "lr"],
        origins["stage2", "epochs"],
        origins["data", "batch_size"],
        origins["data", "path"],
        origins["stage2", "head"],
    ) == ("--set", str(own), "--batch-size", "dataset places-lt", "recipe lift")
    own.write_text('recipe = "lifted"\n')
    with pytest.raises(EcvlError, match="recipe = 'lifted' is not a recipe"):
        load_config(own)


def test_paired_differences_skip_an_empty_shot_group():
    """CIFAR-10-LT at IF 100 has no class under 20 images: `few` is None in every run."""
    per_seed = {
        row: {s: {"few": None, "macro_f1": 0.1 * s + off, "all": 0.2 * s + off} for s in (0, 1)}
        for row, off in (("ballad", 0.0), ("ecvl", 0.05), ("freq-rare", 0.02))
    }
    per_seed["freq-rare"][1]["macro_f1"] = None  # one seed's metric missing: no difference either
    pairs = {(e["row"], e["against"]): e for e in paired(per_seed, [0, 1])}
    e = pairs["ecvl", "ballad"]
    assert e["few"] is None and e["skipped"] == ["few"]
    assert e["macro_f1"]["per_seed"] == pytest.approx([0.05, 0.05]) and e["all"]["mean"] == pytest.approx(0.05)
    assert pairs["ecvl", "freq-rare"]["skipped"] == ["few", "macro_f1"]
    assert pairs["ecvl", "freq-rare"]["all"]["per_seed"] == pytest.approx([0.03, 0.03])


def test_ablate_summary_without_few_or_many_classes(tmp_path, capsys):
    """End to end at the smallest size, on MNIST-LT converted with thresholds that empty the many
    and the few group (counts 500 ... 4): ablation.json, the table and the plot, with the paired
    differences for the metrics that exist."""
    from ecvl_fast.loaders.convert import ConvertOptions, convert

    data = tmp_path / "mnist-medium-only"
    convert(ConvertOptions("mnist-lt", data, workers=1, many_threshold=500, few_threshold=4))
    groups = json.loads((data / "meta.json").read_text())["groups"]
    assert groups["many"] == [] and groups["few"] == [] and len(groups["medium"]) == 10
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY.replace("epochs = 2", "epochs = 1"))
    out = tmp_path / "abl"
    assert (
        main(
            [
                "ablate",
                "--config",
                str(cfg),
                "--seeds",
                "0",
                "--rows",
                "ballad,momentum",
                "--set",
                f"data.path={data}",
                "--set",
                f"run.out={out}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    result = json.loads((out / "ablation.json").read_text())
    for row in result["rows"]:
        assert row["many"] is None and row["few"] is None and row["head_tail_gap"] is None
        assert row["medium"]["mean"] == pytest.approx(row["per_seed"][0]["medium"])
    (e,) = result["paired"]
    assert (e["row"], e["against"], e["few"], e["skipped"]) == ("momentum", "ballad", None, ["few"])
    rows = {r["name"]: r["per_seed"][0] for r in result["rows"]}
    assert e["all"]["per_seed"] == pytest.approx([rows["momentum"]["all"] - rows["ballad"]["all"]])
    stage2 = json.loads((out / "seed0" / "momentum" / "metrics.json").read_text())
    assert stage2["many"] is None and stage2["few"] is None
    assert (out / "ablation.png").stat().st_size > 1000
    momentum_line = next(line for line in printed.splitlines() if line.startswith("│ + momentum"))
    assert momentum_line.count("–") == 3  # many, few, head-tail gap
    assert "paired differences skipped for few" in printed


def test_a_failed_summary_names_the_trained_rows(tmp_path, monkeypatch):
    """The summary fails after every row trained: one line naming the rows' folders, and the next
    run of the same command writes the summary from them without training again."""
    from ecvl_fast.experiments import ablate
    from ecvl_fast.config import save_config

    def fake_training(cfg, stage=1, out=None, **k):  # a finished run: its last checkpoint and metrics saved
        from ecvl_fast.run import checkpoint as ckpt_io

        folder = Path(out or cfg.run.out)
        folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, folder / "config.toml")
        epochs = cfg.stage1.epochs if stage == 1 else cfg.stage2.epochs
        ckpt_io.save(
            folder / "last.pt",
            {
                "model": {},
                "config": cfg.to_dict(),
                "epoch": epochs,
                "stage": stage,
                "model_name": cfg.model.name,
                "num_classes": 1,
                "position": {"epoch": epochs, "step": 0},
            },
        )
        metrics = {k: 0.5 for k in ablate.METRICS} | {
            "few": None,
            "head_tail_gap": None,
            "per_class": [0.5],
            "num_images": 1,
            "predicted_classes": 1,
        }
        (folder / "metrics.json").write_text(json.dumps(metrics_file(metrics, ["a"], {})))
        return metrics

    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY)
    cfg = load_config(toml, [f"run.out={tmp_path / 'abl'}"])
    monkeypatch.setattr(training, "main", fake_training)
    monkeypatch.setattr(ablate, "plot_rows", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(EcvlError) as e:
        ablate.run_ablation(cfg, [0], rows=("ballad", "ecvl"))
    assert "No space left on device" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert str(tmp_path / "abl" / "seed0" / "ballad") in str(e.value) and "run the same command" in str(e.value)
    monkeypatch.undo()
    monkeypatch.setattr(training, "main", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    result = ablate.run_ablation(cfg, [0], rows=("ballad", "ecvl"))
    assert [r["name"] for r in result["rows"]] == ["stage1", "ballad", "ecvl"]
    assert (tmp_path / "abl" / "ablation.json").is_file() and (tmp_path / "abl" / "ablation.png").is_file()


def test_reports_without_matplotlib_keep_the_metrics(tmp_path, monkeypatch, capsys):
    """Where matplotlib is missing (the GPU check machine), a finished run's report still writes
    metrics.json and says in one line that the plot was skipped."""
    import sys

    from ecvl_fast.evaluation.reports import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    metrics = {
        "many": 0.5,
        "medium": None,
        "few": 0.25,
        "all": 0.4,
        "macro_f1": 0.3,
        "head_tail_gap": 0.25,
        "per_class": [0.5, 0.25],
        "num_images": 8,
        "predicted_classes": 2,
    }
    write_report(
        metrics,
        {"classes": ["a", "b"], "train_counts": [200, 5], "groups": {"many": [0], "medium": [], "few": [1]}},
        tmp_path,
        "title",
    )
    saved = read_metrics(tmp_path / "metrics.json")
    assert (saved["many"], saved["medium"], saved["few"]) == (pytest.approx(0.5), None, pytest.approx(0.25))
    assert saved["per_class"] == pytest.approx([0.5, 0.25]) and saved["num_images"] == 8
    assert not (tmp_path / "per_class.png").exists()
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out
