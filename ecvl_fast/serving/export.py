"""`ecvl-fast export`: a training checkpoint -> a classifier to deploy, and the loaders `predict`
uses for all three kinds of file.

- `.pt` (`--format pt`): the image encoder's weights (with its light module), the adapter, the
  class weights (text features, or a cosine head's) and their scale, the class names, the
  test-time views and the preprocessing (resolution, decode size, mean, std). No optimizer state,
  no momentum bank, no text tower. Read back with `weights_only=True`; the encoder is rebuilt from
  its open_clip config.
- `.onnx` (`--format onnx`): the same image path, test-time views included, preprocessed image
  (N, 3, res, res, float) -> class probabilities, with the class names and preprocessing in the
  model's metadata. Needs
  `pip install 'ecvl-fast[onnx]'` (onnx to write, onnxruntime to run).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ecvl_fast import EcvlError
from ecvl_fast.run.files import atomic_write
from ecvl_fast.method.model import ImageTower, Scorer, quick_gelu_of, tte_split
from ecvl_fast.serving.classifier import FORMAT, Classifier, digest


def export(ckpt: Path, out: Path, fmt: str = "pt", views: int | None = None) -> dict:
    """Write the slim classifier of a stage 1 or stage 2 checkpoint; returns what was written.
    `views`: test-time views (default: the checkpoint's data.tte_views)."""
    from ecvl_fast.training.data import load_res
    from ecvl_fast.serving.classifier import load_scorer
    from ecvl_fast.serving.classifier import MEAN, STD, load_checkpoint

    if fmt not in ("pt", "onnx"):
        raise EcvlError(f"--format {fmt}: choose pt or onnx")
    state, cfg = load_checkpoint(ckpt)
    scorer = load_scorer(cfg, state, state["classes"], torch.device("cpu"), views)
    total = cfg.data.tte_views if views is None else views
    stage2 = state["stage"] == 2
    scale = float(scorer.net.logit_scale if scorer.scale is None else scorer.scale)
    visual = scorer.net.clip.visual
    meta = {
        "format": FORMAT,
        "model_name": cfg.model.name,
        "classes": state["classes"],
        "res": cfg.data.res,
        "load_res": load_res(cfg),
        "mean": MEAN.flatten().tolist(),
        "std": STD.flatten().tolist(),
        "stage": state["stage"],
        "ratio": cfg.stage2.ratio,
        "source": str(ckpt),
        "tte_views": total,
        "tte_crops": cfg.data.tte_crops,
        "interp": cfg.aug.interp,
        "peft": cfg.stage2.peft if stage2 else "none",
        "peft_dim": cfg.stage2.peft_dim,
        "quick_gelu": quick_gelu_of(visual),
    }
    if fmt == "pt":
        payload = {
            **meta,
            "visual": visual.state_dict(),
            "logit_scale": scale,
            "class_weights": scorer.weights.cpu(),
            "adapter": None if scorer.adapter is None else scorer.adapter.state_dict(),
        }
        payload["digest"] = digest(payload)
        atomic_write(out, lambda tmp: torch.save(payload, tmp))
    else:
        slim = Scorer(ImageTower(visual, scale), scorer.weights, scorer.adapter, views=scorer.views)
        _export_onnx(Classifier(slim).eval(), meta, out)
    return {"out": str(out), "bytes": out.stat().st_size, "checkpoint_bytes": Path(ckpt).stat().st_size, **meta}


def _export_onnx(model: Classifier, meta: dict, out: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise EcvlError("--format onnx needs the onnx package: pip install 'ecvl-fast[onnx]'") from None
    crops = tte_split(meta["tte_crops"], meta["tte_views"])[1]  # LIFT's five crops: [N, 5, 3, res, res]
    example = torch.zeros(2, *([crops] if crops > 1 else []), 3, meta["res"], meta["res"])

    def write(tmp: Path) -> None:
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused eval kernel has no ONNX form
        try:
            _export(tmp)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "ecvl_fast", json.dumps(meta)
        onnx.save(proto, str(tmp))

    def _export(tmp: Path) -> None:
        with torch.no_grad():  # the TorchScript exporter: no onnxscript needed, and it handles open_clip's towers
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=["probs"],
                dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        atomic_write(out, write)
