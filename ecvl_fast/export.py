"""`ecvl-fast export`: a training checkpoint -> a classifier to deploy, and the loaders `predict`
uses for all three kinds of file.

- `.pt` (`--format pt`): the image encoder's weights, the adapter, the class text features and
  names, and the preprocessing (resolution, decode size, mean, std). No optimizer state, no
  momentum bank, no text tower. Read back with `weights_only=True`; the encoder is rebuilt from
  its open_clip config.
- `.onnx` (`--format onnx`): the same image path, preprocessed image (N, 3, res, res, float) ->
  class probabilities, with the class names and preprocessing in the model's metadata. Needs
  `pip install 'ecvl-fast[onnx]'` (onnx to write, onnxruntime to run).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecvl_fast import EcvlError
from ecvl_fast.files import atomic_write
from ecvl_fast.model import Adapter, adapted_features

FORMAT = "ecvl-fast-classifier/1"


class Classifier(nn.Module):
    """Preprocessed images -> class probabilities: eq. 6 on the image features, through the
    stage-2 adapter (eq. 7) when there is one."""

    def __init__(self, visual: nn.Module, text: torch.Tensor, scale: torch.Tensor, adapter: nn.Module | None):
        super().__init__()
        self.visual, self.adapter = visual, adapter
        self.register_buffer("text", text.float())
        self.register_buffer("scale", scale.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = adapted_features(F.normalize(self.visual(images), dim=-1), self.adapter)
        return (self.scale * features.float() @ self.text.T).softmax(-1)


@dataclass
class Predictor:
    """What `predict` needs of any model file: class names, preprocessing, and probabilities for
    a prepared batch (`ecvl_fast.predict.to_input`)."""
    classes: list[str]
    res: int
    load_res: int
    probs: object  # callable: prepared batch (torch, on `device`) -> probabilities [N, K] (torch, CPU)
    device: torch.device
    kind: str


def export(ckpt: Path, out: Path, fmt: str = "pt") -> dict:
    """Write the slim classifier of a stage 1 or stage 2 checkpoint; returns what was written."""
    from ecvl_fast.data import load_res
    from ecvl_fast.eval_cli import load_classifier
    from ecvl_fast.predict import MEAN, STD, load_checkpoint

    if fmt not in ("pt", "onnx"):
        raise EcvlError(f"--format {fmt}: choose pt or onnx")
    state, cfg = load_checkpoint(ckpt)
    net, text, adapter = load_classifier(cfg, state, state["classes"], torch.device("cpu"))
    meta = {"format": FORMAT, "model_name": cfg.model.name, "classes": state["classes"], "res": cfg.data.res,
            "load_res": load_res(cfg), "mean": MEAN.flatten().tolist(), "std": STD.flatten().tolist(),
            "stage": state["stage"], "ratio": cfg.stage2.ratio, "source": str(ckpt)}
    if fmt == "pt":
        payload = {**meta, "visual": net.clip.visual.state_dict(), "logit_scale": net.logit_scale.detach().clone(),
                   "adapter": None if adapter is None else adapter.state_dict(), "text_features": text.cpu()}
        atomic_write(out, lambda tmp: torch.save(payload, tmp))
    else:
        _export_onnx(Classifier(net.clip.visual, text, net.logit_scale.detach(), adapter).eval(), meta, out)
    return {"out": str(out), "bytes": out.stat().st_size, "checkpoint_bytes": Path(ckpt).stat().st_size, **meta}


def _export_onnx(model: Classifier, meta: dict, out: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise EcvlError("--format onnx needs the onnx package: pip install 'ecvl-fast[onnx]'") from None
    example = torch.zeros(2, 3, meta["res"], meta["res"])

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
            torch.onnx.export(model, (example,), str(tmp), input_names=["image"], output_names=["probs"],
                              dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}}, opset_version=17,
                              dynamo=False)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        atomic_write(out, write)


def load_predictor(path: Path, device: torch.device) -> Predictor:
    """A training checkpoint, an exported `.pt`, or an `.onnx`, ready to classify prepared batches."""
    path = Path(path)
    if not path.is_file():
        raise EcvlError(f"{path}: no such model file")
    if path.suffix == ".onnx":
        return _onnx_predictor(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # empty, truncated or foreign: the checkpoint reader says which, and what else is there
        from ecvl_fast import checkpoint as ckpt_io

        ckpt_io.load(path)
        raise
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return _exported_predictor(state, device)
    return _checkpoint_predictor(path, device)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _checkpoint_predictor(path: Path, device: torch.device) -> Predictor:
    from ecvl_fast.data import load_res
    from ecvl_fast.eval_cli import load_classifier
    from ecvl_fast.evaluate import predict_logits
    from ecvl_fast.predict import load_checkpoint

    state, cfg = load_checkpoint(path)
    net, text, adapter = load_classifier(cfg, state, state["classes"], device)
    return Predictor(state["classes"], cfg.data.res, load_res(cfg),
                     lambda x: predict_logits(net, x, text, adapter).softmax(1).cpu(), device, "checkpoint")


def _exported_predictor(d: dict, device: torch.device) -> Predictor:
    from ecvl_fast.config import ModelCfg
    from ecvl_fast.model import build_clip

    clip, _ = build_clip(ModelCfg(name=d["model_name"]), load_weights=False)
    visual = clip.visual
    visual.load_state_dict(d["visual"])
    adapter = None
    if d["adapter"] is not None:
        adapter = Adapter(d["text_features"].shape[1], d["ratio"])
        adapter.load_state_dict(d["adapter"])
    model = Classifier(visual, d["text_features"], d["logit_scale"], adapter).to(device).eval()

    @torch.no_grad()
    def probs(x):
        with _autocast(device):
            return model(x).float().cpu()

    return Predictor(d["classes"], d["res"], d["load_res"], probs, device, "exported")


def _onnx_predictor(path: Path) -> Predictor:
    try:
        import onnxruntime as ort
    except ImportError:
        raise EcvlError(f"{path}: running ONNX needs onnxruntime: pip install 'ecvl-fast[onnx]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    if "ecvl_fast" not in props:
        raise EcvlError(f"{path}: not an ONNX file written by ecvl-fast export (no class names in it)")
    meta = json.loads(props["ecvl_fast"])

    def probs(x):
        return torch.from_numpy(session.run(None, {"image": np.ascontiguousarray(x.float().cpu().numpy())})[0])

    return Predictor(meta["classes"], meta["res"], meta["load_res"], probs, torch.device("cpu"), "onnx")
