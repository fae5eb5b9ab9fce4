"""The device check's first steps, and the rehearsal's: everything a run imports, the real
memory-driven RandAugment pipeline (DALI conditionals) fed from memory, `predict` from a stage-2
checkpoint, and `bench step` on the tiny model. One line per step; exit 1 if any step failed.

  python .ci/smoke.py --device cuda|cpu [--out DIR]
"""

import argparse
import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

MODULES = [  # every module of the package (tests/test_layout.py checks the list is whole)
    "ecvl_fast",
    "ecvl_fast.cli",
    "ecvl_fast.config",
    "ecvl_fast.method.model",
    "ecvl_fast.method.losses",
    "ecvl_fast.method.rows",
    "ecvl_fast.method.peft",
    "ecvl_fast.recipes",
    "ecvl_fast.method.stage2",
    "ecvl_fast.training.loop",
    "ecvl_fast.training.data",
    "ecvl_fast.run.precision",
    "ecvl_fast.run.lifecycle",
    "ecvl_fast.run.checkpoint",
    "ecvl_fast.run.files",
    "ecvl_fast.run.dist",
    "ecvl_fast.run.logs",
    "ecvl_fast.evaluation.metrics",
    "ecvl_fast.evaluation.reports",
    "ecvl_fast.serving.classifier",
    "ecvl_fast.serving.export",
    "ecvl_fast.serving.predict",
    "ecvl_fast.experiments.ablate",
    "ecvl_fast.experiments.demo",
    "ecvl_fast.experiments.evaluate",
    "ecvl_fast.experiments.presets",
    "ecvl_fast.experiments.pretrain",
    "ecvl_fast.bench.host",
    "ecvl_fast.bench.device",
    "ecvl_fast.bench.machine",
    "ecvl_fast.bench.synthetic",
    "ecvl_fast.bench.tables",
    "ecvl_fast.loaders.dali_loader",
    "ecvl_fast.loaders.dali_graph",
    "ecvl_fast.loaders.draws",
    "ecvl_fast.loaders.canvas",
    "ecvl_fast.loaders.held",
    "ecvl_fast.loaders.randaug_ops",
    "ecvl_fast.loaders.torch_reference",
    "ecvl_fast.kernels.bank",
    "ecvl_fast.kernels.cpu",
    "nvidia.dali",
    "nvidia.dali.plugin.pytorch",
    "open_clip",
    "torchvision",
    "typer",
    "rich",
    "tqdm",
    "PIL",
    "pytest",
]


def imports(device):
    for name in MODULES + (["ecvl_fast.kernels.cuda"] if device.type == "cuda" else []):
        importlib.import_module(name)
    return f"{len(MODULES)} modules"


def pipeline(device):
    """Two views, k=2, every sample at M = 1 (every drawn op applied): the graph training builds."""
    import numpy as np
    import torch

    from ecvl_fast.kernels.bank import StaticMagnitudes
    from ecvl_fast.loaders.dali_loader import AugmentedLoader
    from ecvl_fast.loaders.draws import AugSpec
    from ecvl_fast.loaders.held import HeldLoader
    from ecvl_fast.bench.synthetic import fake_images

    imgs, labels = fake_images(128, 0, 40), np.arange(128) % 10
    out = {}
    for m in (0.0, 1.0):
        loader = AugmentedLoader(
            HeldLoader(imgs, labels, "sequential", 32),
            AugSpec(res=32, views=2, k=2),
            StaticMagnitudes(np.full(128, m)),
            device=device,
        )
        out[m] = torch.cat([torch.cat(v) for v, _, _ in loader]).float().cpu()
    assert out[1.0].shape == (128 * 2, 3, 32, 32)
    assert torch.isfinite(out[1.0]).all()
    changed = (out[1.0] - out[0.0]).abs().mean().item()
    assert changed > 0.05, f"M = 1 changed the views by only {changed:.3f}"
    return f"{len(out[1.0])} views, mean |M=1 - M=0| = {changed:.3f}"


def predict(device):
    import numpy as np
    from PIL import Image

    from ecvl_fast.run import dist as D
    from ecvl_fast.config import Config, DataCfg, ModelCfg, RunCfg, Stage2Cfg
    from ecvl_fast.run.lifecycle import Position
    from ecvl_fast.serving.predict import run_predict
    from ecvl_fast.bench.synthetic import fake_images
    from ecvl_fast.training.loop import build_run, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(
            data=DataCfg(res=32),
            model=ModelCfg(name="ecvl-tiny-vit"),
            run=RunCfg(device=device.type, out=tmp),
            stage2=Stage2Cfg(init="none"),
        )
        meta = {"classes": [f"digit {i}" for i in range(10)], "train_labels": np.arange(40) % 10}
        run = build_run(cfg, D.Dist(0, 0, 1, device), meta, steps_per_epoch=1, stage=2, out=Path(tmp))
        save_checkpoint(run, Position(1, 0, 0.0))
        paths = []
        for i, img in enumerate(fake_images(4, 1, 32)):
            paths.append(Path(tmp) / f"{i}.png")
            Image.fromarray(img).save(paths[-1])
        preds = run_predict(Path(tmp) / "last.pt", paths, top_k=3, device=device.type)
    assert len(preds) == 4 and all(len(p.classes) == 3 and 0 < sum(p.probs) <= 1 + 1e-4 for p in preds)
    return f"4 images, top-1 {preds[0].classes[0]!r} p={preds[0].probs[0]:.3f}"


def bench_step(device):
    from ecvl_fast.cli import main

    code = main(
        [
            "bench",
            "step",
            "--device",
            device.type,
            "--model",
            "ecvl-tiny-vit",
            "--res",
            "32",
            "--batch",
            "8",
            "--steps",
            "2",
            "--repeats",
            "1",
        ]
    )
    assert code == 0, f"exit {code}"
    return "exit 0"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    import torch

    device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    failed = 0
    for step in (imports, pipeline, predict, bench_step):
        t0 = time.perf_counter()
        try:
            note = step(device)
            print(f"ok      {step.__name__:10s} {time.perf_counter() - t0:6.1f}s  {note}", flush=True)
        except BaseException as e:  # every step runs; the first line of each failure is reported
            failed += 1
            print(
                f"FAILED  {step.__name__:10s} {time.perf_counter() - t0:6.1f}s  {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}",
                flush=True,
            )
            traceback.print_exc(file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
