"""`ecvl-fast convert`: profiles, round-trips, shot groups and every bad input."""

import json
import pickle
import sys

import numpy as np
import pytest

from ecvl_fast.cli import main
from ecvl_fast.loaders import sources
from ecvl_fast.loaders.convert import ConvertOptions, convert, shot_groups
from ecvl_fast.loaders.ffcv_loader import make_loader

from conftest import write_tree


def read_all(path, res):
    images, labels, index = [], [], []
    for im, y, ix in make_loader(path, "sequential", 16, res):
        images.append(im.numpy().copy()), labels.append(y.numpy().copy()), index.append(ix.numpy().copy())
    return np.concatenate(images), np.concatenate(labels), np.concatenate(index)


def test_cifar_lt_profiles():
    assert sources.long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    c100 = sources.long_tail_counts(500, 100, 100)
    assert sum(c100) == 10847 and c100[0] == 500 and c100[-1] == 5


def test_long_tail_selection_is_ldam_style():
    labels = np.repeat(np.arange(3), 10)
    keep = sources.long_tail_indices(labels, 3, 4.0, seed=0)
    rng = np.random.RandomState(0)
    expect = []
    for c, n in enumerate([10, 5, 2]):
        ix = np.flatnonzero(labels == c)
        rng.shuffle(ix)
        expect += ix[:n].tolist()
    assert keep.tolist() == expect


def test_shot_group_boundaries():
    g = shot_groups(np.array([101, 100, 20, 19, 5]))
    assert g == {"many": [0], "medium": [1, 2], "few": [3, 4]}
    assert shot_groups(np.array([10, 50]), many=40, few=10) == {"many": [1], "medium": [0], "few": []}


@pytest.mark.parametrize("fmt", ["raw", "jpg"])
def test_cifar_pickles_round_trip(tmp_path, cifar10_dir, fmt):
    out = tmp_path / "out"
    meta = convert(ConvertOptions("cifar10-lt", out, source=cifar10_dir, imbalance=10, format=fmt, workers=1))
    assert meta["train_counts"] == sources.long_tail_counts(50, 10, 10)
    assert meta["images"] == {"train": sum(meta["train_counts"]), "test": 50}
    d = pickle.loads((cifar10_dir / "test_batch").read_bytes())
    want = d["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    images, labels, index = read_all(out / "test.beton", 32)
    assert index.tolist() == list(range(50)) and labels.tolist() == d["labels"]
    err = np.abs(images.astype(int) - want.astype(int))
    if fmt == "raw":
        assert err.max() == 0
    else:
        assert 0 < err.mean() < 4
    saved = json.loads((out / "meta.json").read_text())
    assert set(saved["sha256"]) == {"train.beton", "test.beton"} and saved["format"] == fmt


def test_split_files_and_image_tree(tmp_path, split_dataset):
    root, train, test = split_dataset
    out = tmp_path / "lt"
    meta = convert(
        ConvertOptions(
            "list", out, root=root, train_split=train, test_split=test, workers=1, many_threshold=20, few_threshold=10
        )
    )
    assert meta["train_counts"] == [30, 12, 5]
    assert meta["groups"] == {"many": [0], "medium": [1], "few": [2]}
    assert meta["classes"] == ["c00", "c01", "c02"]
    images, labels, _ = read_all(out / "train.beton", 24)
    assert images.shape == (47, 24, 24, 3) and np.bincount(labels).tolist() == [30, 12, 5]


def test_folder_dataset(tmp_path):
    write_tree(tmp_path / "src" / "train", [4, 3])
    write_tree(tmp_path / "src" / "test", [2, 2])
    meta = convert(ConvertOptions("folder", tmp_path / "out", source=tmp_path / "src", workers=1))
    assert meta["train_counts"] == [4, 3] and meta["images"]["test"] == 4


def test_mnist_lt_builds_offline(tmp_path):
    meta = convert(ConvertOptions("mnist-lt", tmp_path / "m", workers=1))
    counts = meta["train_counts"]
    assert counts == sorted(counts, reverse=True) and counts[0] / counts[-1] >= 50
    assert meta["images"]["test"] == 1000 and len(meta["groups"]["few"]) > 0


def cli_error(args, capsys):
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("error:") and "\n" not in err
    return err


def test_bad_inputs(tmp_path, split_dataset, capsys, cifar10_dir):
    root, train, test = split_dataset
    base = ["convert", "list", "--root", str(root), "--test-split", str(test), "--workers", "1"]
    out = tmp_path / "out"
    assert "no such CIFAR source" in cli_error(
        ["convert", "cifar10-lt", "--out", str(out), "--source", str(tmp_path / "nope")], capsys
    )
    bad = tmp_path / "bad.txt"
    bad.write_text(train.read_text() + "just-one-field\n")
    assert f"{bad}:48" in cli_error(base + ["--out", str(out), "--train-split", str(bad)], capsys)
    bad.write_text(train.read_text().replace(" 2\n", " 7\n", 1))
    assert "out of range" in cli_error(
        base + ["--out", str(out), "--train-split", str(bad), "--classes", str(_classes(tmp_path))], capsys
    )
    bad.write_text("".join(ln + "\n" for ln in train.read_text().splitlines() if not ln.endswith(" 1")))
    assert "class 1" in cli_error(base + ["--out", str(out), "--train-split", str(bad)], capsys)
    (cifar10_dir / "test_batch").write_bytes(b"not a pickle")
    assert "test_batch" in cli_error(["convert", "cifar10-lt", "--out", str(out), "--source", str(cifar10_dir)], capsys)
    assert "--format" in cli_error(base + ["--out", str(out), "--train-split", str(train), "--format", "png"], capsys)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def _classes(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("a\nb\nc\n")
    return p


def test_corrupt_image_fails_or_is_skipped(tmp_path, split_dataset, capsys):
    root, train, test = split_dataset
    victim = sorted((root / "train" / "c00").glob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:40])
    args = [
        "convert",
        "list",
        "--root",
        str(root),
        "--train-split",
        str(train),
        "--test-split",
        str(test),
        "--workers",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]
    assert victim.name in cli_error(args, capsys)
    assert not (tmp_path / "out").exists()
    assert main(args + ["--skip-bad"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"]["train"] == 1 and meta["train_counts"][0] == 29
    assert "already exists" in cli_error(args + ["--skip-bad"], capsys)
    assert main(args + ["--skip-bad", "--overwrite", "--format", "jpg"]) == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["format"] == "jpg"


def test_import_does_not_load_ffcv_or_dali():
    import subprocess

    code = (
        "import ecvl_fast, ecvl_fast.cli, ecvl_fast.loaders.convert, ecvl_fast.training.loop, "
        "ecvl_fast.experiments.evaluate, sys, ecvl_fast.serving.predict, ecvl_fast.bench.device, "
        "ecvl_fast.experiments.ablate, ecvl_fast.experiments.demo, ecvl_fast.loaders.held; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ffcv', 'nvidia')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def write_tiny_imagenet(root, per_class=40, val_per_class=3, wnids=("n001", "n002", "n003", "n004"), extra=("n999",)):
    """Tiny-ImageNet's layout from generated JPEGs: train/<wnid>/images, val/images + annotations."""
    from PIL import Image

    from ecvl_fast.bench.synthetic import fake_images

    for c, w in enumerate(tuple(wnids) + tuple(extra)):
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        for i, img in enumerate(fake_images(per_class, c, 16)):
            Image.fromarray(img).save(folder / f"{w}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for c, w in enumerate(wnids):
        for i, img in enumerate(fake_images(val_per_class, 50 + c, 16)):
            name = f"val_{c}_{i}.JPEG"
            Image.fromarray(img).save(root / "val" / "images" / name)
            lines.append(f"{name}\t{w}\t0\t0\t15\t15")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids))  # no newline after the last, as in the real file
    (root / "words.txt").write_text(
        "".join(f"{w}\tname{c}, other name\n" for c, w in enumerate(wnids)) + "n999\tspare\n"
    )
    return root


def test_tiny_imagenet_lt(tmp_path, capsys):
    src = write_tiny_imagenet(tmp_path / "tin")
    out = tmp_path / "out"
    assert (
        main(
            [
                "convert",
                "tiny-imagenet-lt",
                "--source",
                str(src),
                "--out",
                str(out),
                "--imbalance",
                "10",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_counts"] == sources.long_tail_counts(40, 4, 10) == [40, 18, 8, 4]
    assert meta["classes"] == ["name0", "name1", "name2", "name3"] and meta["images"]["test"] == 12
    assert meta["source_info"]["ignored_train_folders"] == 1  # n999 is not in wnids.txt
    _, labels, _ = read_all(out / "test.beton", 16)
    assert np.bincount(labels).tolist() == [3, 3, 3, 3]
    sub = tmp_path / "half.txt"
    sub.write_text("n003\nn001\n")
    assert (
        main(
            [
                "convert",
                "tiny-imagenet-lt",
                "--source",
                str(src),
                "--out",
                str(tmp_path / "half"),
                "--imbalance",
                "1",
                "--wnids",
                str(sub),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    half = json.loads((tmp_path / "half" / "meta.json").read_text())
    assert half["classes"] == ["name2", "name0"] and half["train_counts"] == [40, 40] and half["images"]["test"] == 6
    # --val-per-class: a val split from the train images the profile left out; train unchanged
    assert (
        main(
            [
                "convert",
                "tiny-imagenet-lt",
                "--source",
                str(src),
                "--out",
                str(tmp_path / "val"),
                "--imbalance",
                "10",
                "--workers",
                "1",
                "--val-per-class",
                "5",
            ]
        )
        == 0
    )
    with_val = json.loads((tmp_path / "val" / "meta.json").read_text())
    assert with_val["train_counts"] == meta["train_counts"] and with_val["images"]["val"] == 15
    train_px, _, _ = read_all(tmp_path / "val" / "train.beton", 16)
    val_px, val_labels, _ = read_all(tmp_path / "val" / "val.beton", 16)
    assert np.bincount(val_labels).tolist() == [0, 5, 5, 5]  # class 0 kept all 40 of its images
    assert not {v.tobytes() for v in val_px} & {t.tobytes() for t in train_px}


def test_a_val_split_carved_from_train_for_any_source(tmp_path, capsys):
    """--val-per-class on a folder: up to N train images per class move to a val split, seeded, each
    class keeping one in train; recorded in meta.json. A source with a val split of its own refuses."""
    root = tmp_path / "imgs"
    write_tree(root / "train", [6, 3, 2]), write_tree(root / "test", [2, 2, 2], seed=5)
    assert (
        main(
            [
                "convert",
                "folder",
                "--source",
                str(root),
                "--out",
                str(tmp_path / "d"),
                "--val-per-class",
                "2",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["train_counts"] == [4, 1, 1] and meta["images"] == {"train": 6, "val": 5, "test": 6}
    assert meta["source_info"]["val_carved_from_train"] == {"per_class": 2, "seed": 0}
    train_px, _, _ = read_all(tmp_path / "d" / "train.beton", 24)
    val_px, val_labels, _ = read_all(tmp_path / "d" / "val.beton", 24)
    assert np.bincount(val_labels).tolist() == [2, 2, 1]
    assert not {v.tobytes() for v in val_px} & {t.tobytes() for t in train_px}
    write_tree(root / "val", [1, 1, 1], seed=7)
    assert "already has a val split" in cli_error(
        ["convert", "folder", "--source", str(root), "--out", str(tmp_path / "e"), "--val-per-class", "2"], capsys
    )


def test_tiny_imagenet_bad_inputs(tmp_path, capsys):
    src = write_tiny_imagenet(tmp_path / "tin", per_class=6)
    out = tmp_path / "out"
    args = [
        "convert",
        "tiny-imagenet-lt",
        "--source",
        str(src),
        "--out",
        str(out),
        "--workers",
        "1",
        "--imbalance",
        "2",
    ]
    sub = tmp_path / "sub.txt"
    sub.write_text("n001\nn777\n")
    assert "n777 is not in" in cli_error(args + ["--wnids", str(sub)], capsys)
    ann = src / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_x.JPEG\tn555\t0\t0\t1\t1\n")
    assert "unknown class n555" in cli_error(args, capsys)
    ann.write_text(good + "val_missing.JPEG\tn001\t0\t0\t1\t1\n")
    assert "val_missing.JPEG: no such image" in cli_error(args, capsys)
    ann.write_text(good)
    victim = src / "train" / "n001" / "images" / "n001_3.JPEG"  # class 0 keeps all of its images
    victim.write_bytes(victim.read_bytes()[:30])
    assert "n001_3.JPEG" in cli_error(args, capsys)
    assert main(args + ["--skip-bad"]) == 0
    assert json.loads((out / "meta.json").read_text())["skipped"]["train"] == 1
    ann.unlink()
    assert "val_annotations.txt: no such annotation file" in cli_error(args + ["--overwrite"], capsys)
    assert "no such Tiny-ImageNet folder" in cli_error(
        ["convert", "tiny-imagenet-lt", "--source", str(tmp_path / "no"), "--out", str(tmp_path / "o2")], capsys
    )
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2.tmp-*"))
