"""What the user runs, as written: the README's "Train on your own images" commands, read from the
README and run on a small folder of photos (only epochs change), and every packaged preset trained
for one step with its own model and resolution (only the data, the batch and the epochs change;
random weights, as no test downloads any)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecvl_fast.cli import main
from ecvl_fast.experiments.presets import names

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def code_blocks(section: str) -> list[str]:
    return re.findall(r"```(?:\w*)\n(.*?)```", section, re.S)


def photos(root: Path, counts: list[int], seed: int = 0) -> None:
    """Photo-like JPEGs of several sizes and aspects (4:3, 3:4, square), one folder per class."""
    rng = np.random.default_rng(seed)
    sizes = [(80, 60), (60, 80), (72, 72), (96, 54)]
    for c, n in enumerate(counts):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            base = np.linspace(0, 1, w)[None, :, None] * rng.uniform(40, 200, 3) + c * 30
            img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i:03d}.jpg", quality=92)


def test_the_readme_commands_for_your_own_images_run_as_written(tmp_path):
    """The section's commands, run in order from a folder holding `mydata/` and `photo.jpg`, with
    `--epochs 1` added to `train` (the one change), then its Python example on the trained model."""
    section = readme_section("Train on your own images")
    blocks = code_blocks(section)
    commands = [line for line in blocks[1].splitlines() if line.startswith("ecvl-fast ")]
    assert [c.split()[1] for c in commands] == ["convert", "train", "train", "predict"]
    assert commands[1].endswith(" --trial") and commands[2] == commands[1][: -len(" --trial")]
    photos(tmp_path / "mydata" / "train", [48, 14, 6])  # more than the starter's batch of 64
    photos(tmp_path / "mydata" / "test", [3, 3, 3], seed=1)
    Image.open(tmp_path / "mydata" / "test" / "class1" / "000.jpg").save(tmp_path / "photo.jpg")
    for command in commands:
        args = shlex.split(command)[1:]
        if args[0] == "train":
            args += ["--epochs", "1"]
        done = subprocess.run(
            [str(BIN / "ecvl-fast"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
        if args[0] == "train":
            assert "model ecvl-small-rn at 64 px" in done.stdout and "Traceback" not in done.stderr
        if "--trial" in args:  # its own folder, both stages, a short evaluation
            trial = json.loads((tmp_path / "runs" / "mine-trial" / "stage2" / "metrics.json").read_text())
            assert trial["trial"] and trial["num_images"] == 9 and not (tmp_path / "runs" / "mine").exists()
    assert "photo.jpg" in done.stdout and "class" in done.stdout  # predict's table
    example = next(b for b in blocks if "classify(" in b)
    code = "\n".join(line[2:] if line.startswith("  ") else line for line in example.splitlines())
    code = code.replace('"model.pt"', '"runs/mine/stage2/best.pt"').replace('"cat.jpg"', '"photo.jpg"')
    code = "from PIL import Image\npil_image = Image.open('photo.jpg')\n" + code
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.strip().splitlines()
    assert len(printed) == 2 and all("class" in line for line in printed)


# The paper's presets (RN50, stage 1 on both towers, 80 prompts per class) run in their own module,
# so that pytest-xdist's --dist loadscope can give them a worker of their own.
PAPER = ("cifar100-lt", "imagenet-lt", "places-lt")


@pytest.fixture(scope="module")
def tiny_photos(tmp_path_factory):
    """Eight train photos in three classes (one step at batch 8), three test photos."""
    from ecvl_fast.loaders.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("presets")
    photos(root / "src" / "train", [4, 2, 2])
    photos(root / "src" / "test", [1, 1, 1], seed=1)
    convert(ConvertOptions("folder", root / "data", source=root / "src", workers=1))
    return root / "data"


def one_step(preset: str, data, out, capsys) -> None:
    """The preset as packaged (its model, resolution, workers, views, light module, test-time crops),
    with random weights; a preset that cannot take one step fails here."""
    from ecvl_fast.config import load_config
    from ecvl_fast.experiments.presets import resolve

    args = [
        "train",
        "--config",
        preset,
        "--set",
        f"data.path={data}",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--pretrained",
        "none",
        "--out",
        str(out),
    ]
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    printed = capsys.readouterr().out
    assert "stage 2 done" in printed and (out / "stage2" / "metrics.json").is_file()
    cfg = load_config(resolve(preset))
    assert f"model {cfg.model.name} at {cfg.data.res} px" in printed
    if cfg.model.pretrained == "openai":  # OpenAI's weights: QuickGELU, even with none loaded here
        assert "activation: QuickGELU" in printed


@pytest.mark.parametrize("preset", [n for n in names() if n not in PAPER])
def test_every_packaged_preset_takes_a_step(preset, tiny_photos, tmp_path, capsys):
    one_step(preset, tiny_photos, tmp_path / "run", capsys)
