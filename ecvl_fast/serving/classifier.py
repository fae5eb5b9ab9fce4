"""One classifier for serving: load a training checkpoint or an exported `.pt` / `.onnx`, prepare
images as `eval` does, and classify them; `predict`, `export`, `eval` and `bench infer` all use it.

No ffcv or DALI: images are decoded with PIL and prepared as the eval path prepares them (`decode`:
fitted as on the loader's canvas, evaluation's centre crop, CLIP normalisation), so predictions
match `eval`'s.

One model, four wrappers, each for one reader:
- `Scorer` (method/model.py): prepared images -> logits; `load_scorer` builds it from a checkpoint
  (or the zero-shot model) for `eval`, `export` and `bench infer`;
- `Classifier`: a Scorer's softmax, the nn.Module `export` writes and ONNX traces;
- `Predictor`: what `predict` needs of any model file (class names, preprocessing, probabilities),
  from `load_predictor`;
- `Model`: the Python API around a Predictor, from `load(path).classify(images)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from ecvl_fast import EcvlError
from ecvl_fast.config import Config, from_dict, trained_scale
from ecvl_fast.method import stage2 as two
from ecvl_fast.method.model import (
    Adapter,
    ClipNet,
    ImageTower,
    Scorer,
    build_clip,
    class_text_features,
    prompt_tokens,
    set_activation,
    trained_quick_gelu,
    tte_split,
)
from ecvl_fast.run import checkpoint as ckpt_io
from ecvl_fast.run import precision

MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)  # CLIP's normalisation, as open_clip gives it
STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


@dataclass(frozen=True)
class Prediction:
    path: str
    classes: list[str]
    probs: list[float]


_ON_DEVICE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normaliser(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD on `device`, copied there once: a copy per batch from pageable memory would
    sync with the host on every batch."""
    if device not in _ON_DEVICE:
        _ON_DEVICE[device] = (MEAN.to(device), STD.to(device))
    return _ON_DEVICE[device]


def decode(image, load_res: int, res: int, crops: int = 1, interp: str = "linear") -> np.ndarray:
    """uint8 [res, res, 3] (or [5, res, res, 3] with LIFT's five crops, `crops` 5) from an image
    file or a PIL image, as the eval pipeline prepares it: the
    image fitted as on the loader's canvas (short side at most load_res, OpenCV's area filter, as
    the ffcv decoder), then evaluation's centre crop (Resize(load_res) + CenterCrop(res)'s pixels)
    resized to res with the linear filter DALI uses (the crop is never larger than res, so no
    antialiasing applies), edges repeated as on the canvas. `interp` "cubic" (aug.interp, LIFT+'s):
    PIL's bicubic, within a fraction of a level of DALI's cubic filter where a crop is enlarged."""
    from PIL import Image

    from ecvl_fast.loaders.canvas import canvas_side, fitted
    from ecvl_fast.loaders.draws import centre_boxes, five_crop_boxes
    from ecvl_fast.training.data import five_crop_resize

    from ecvl_fast.loaders.sources import rgb

    if isinstance(image, Image.Image):
        img = rgb(image)
    else:
        with Image.open(image) as im:
            img = rgb(im)
    h, w = img.shape[:2]
    short = load_res if crops == 1 else five_crop_resize(res)  # as training.data.eval_loader decodes
    (fh,), (fw,) = fitted([h], [w], short, canvas_side(short, max(h, w)))
    if (fh, fw) != (h, w):
        import cv2

        img = cv2.resize(img, (int(fw), int(fh)), interpolation=cv2.INTER_AREA)
    boxes = (
        centre_boxes([fh], [fw], max(res, load_res), res)
        if crops == 1
        else five_crop_boxes([fh], [fw], five_crop_resize(res), res)[:, 0]
    )
    if interp == "cubic":  # PIL's bicubic is within a fraction of a level of DALI's cubic filter
        pil = Image.fromarray(img)
        box = lambda b: (b[1] * fw, b[0] * fh, b[3] * fw, b[2] * fh)  # noqa: E731
        out = np.stack([np.asarray(pil.resize((res, res), Image.BICUBIC, box=box(b))) for b in boxes.astype(float)])
        return out[0] if crops == 1 else out
    centres = (np.arange(res) + 0.5) / res
    grids = []
    for y0, x0, y1, x1 in boxes.astype(np.float64):
        gy = (y0 + centres * (y1 - y0)) * 2 - 1  # grid_sample's coordinates: -1 and 1 are the outer edges
        gx = (x0 + centres * (x1 - x0)) * 2 - 1
        grids.append(np.stack(np.meshgrid(gx, gy), -1))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()  # a writable copy
    grid = torch.from_numpy(np.stack(grids).astype(np.float32))
    out = torch.nn.functional.grid_sample(
        x.expand(len(grids), -1, -1, -1),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    out = out.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()
    return out[0] if crops == 1 else out


def to_input(batch, res: int, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 NHWC (numpy, or a tensor) -> normalised NCHW at `res` (antialiased linear resize, as
    the eval pipeline), channels_last; `dtype` (default bf16) on GPU. The uint8 batch moves to the
    device first and is prepared there: a quarter of the bytes of float over the bus, and the
    resize on the GPU."""
    x = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
    if device.type == "cuda" and not x.is_cuda:
        x = (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    x = x.to(device).permute(0, 3, 1, 2).float()
    if x.shape[-1] != res:
        x = torch.nn.functional.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    mean, std = _normaliser(x.device)
    x = ((x / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
    return x.to(dtype or torch.bfloat16) if device.type == "cuda" else x


def prepare(arrays: np.ndarray, res: int, device: torch.device) -> torch.Tensor:
    """`decode`'s uint8 images [N, H, W, 3], or their views [N, V, H, W, 3], as the model's input."""
    if arrays.ndim == 4:
        return to_input(arrays, res, device)
    x = to_input(arrays.reshape(-1, *arrays.shape[2:]), res, device)
    return x.reshape(arrays.shape[0], arrays.shape[1], *x.shape[1:])


def load_checkpoint(ckpt: Path) -> tuple[dict, Config]:
    state = ckpt_io.load(ckpt)
    if state.get("stage") not in (1, 2) or "classes" not in state:
        raise EcvlError(f"{ckpt}: not a stage 1 or stage 2 training checkpoint (no stage/classes)")
    return state, from_dict(state["config"], f"{ckpt} config")


class Model:
    """A trained or exported classifier for Python code:

        model = load("model.pt")                   # `export`'s .pt or .onnx, or a training checkpoint
        for p in model.classify(["cat.jpg", pil_image], top_k=3):
            print(p.path, p.classes, p.probs)      # the top classes, most likely first

    Images are prepared as `eval` prepares them, so the probabilities match `predict`'s."""

    def __init__(self, predictor):
        self.predictor = predictor

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    def classify(self, images, top_k: int = 5) -> list[Prediction]:
        """Image files or PIL images (or one of either) -> one Prediction each (top_k classes, or all
        there are)."""
        from PIL import Image

        if isinstance(images, (str, Path, Image.Image)):
            images = [images]

        p = self.predictor
        arrays = [decode(im, p.load_res, p.res, p.crops, p.interp) for im in images]
        names = [
            getattr(im, "filename", "") or f"image {i}" if isinstance(im, Image.Image) else str(im)
            for i, im in enumerate(images)
        ]
        return self._top(np.stack(arrays), names, top_k)

    def _top(self, arrays: np.ndarray, names: list[str], top_k: int) -> list[Prediction]:
        p = self.predictor
        probs = p.probs(prepare(arrays, p.res, p.device))
        values, ix = probs.topk(min(top_k, len(p.classes)), dim=1)
        return [
            Prediction(name, [p.classes[i] for i in ii], pi)
            for name, pi, ii in zip(names, values.tolist(), ix.tolist())
        ]


def load(path: str | Path, device: str = "auto", tte: int | None = None, compile: bool = False) -> Model:
    """An exported `.pt` or `.onnx`, or a stage 1/2 training checkpoint, ready to classify.
    `tte`: test-time views (1 = none), over the model's own setting. `compile`: the model compiled
    as one frozen graph (not an .onnx): worth its compilation (seconds to minutes, once per batch
    shape: classify batches of one size) on a GPU over many images."""
    from ecvl_fast.run.dist import resolve_device

    return Model(load_predictor(Path(path), resolve_device(device), tte, compile))


FORMAT = "ecvl-fast-classifier/1"


def digest(d: dict) -> str:
    """sha256 over an exported classifier's tensors and settings, in key order (its own "digest"
    aside): written at export, checked on load, so a changed or damaged file is refused."""
    import hashlib

    h = hashlib.sha256()

    def feed(key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
        elif isinstance(value, dict):
            for k in sorted(value):
                feed(f"{key}.{k}", value[k])
        else:
            h.update(f"{key}={json.dumps(value, sort_keys=True, default=str)}".encode())

    for k in sorted(d):
        if k != "digest":
            feed(k, d[k])
    return h.hexdigest()


class Classifier(nn.Module):
    """Preprocessed images -> class probabilities: a Scorer's logits (the image tower with its
    light module, the adapter, the class weights, the test-time views), softmaxed."""

    def __init__(self, scorer: Scorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scorer(images).float().softmax(-1)


@dataclass
class Predictor:
    """What `predict` needs of any model file: class names, preprocessing, and probabilities for
    a prepared batch (`to_input`, above)."""

    classes: list[str]
    res: int
    load_res: int
    probs: object  # callable: prepared batch (torch, on `device`) -> probabilities [N, K] (torch, CPU)
    device: torch.device
    kind: str
    crops: int = 1  # views prepared per image (LIFT's five crops: 5)
    interp: str = "linear"  # the crop's resize filter (aug.interp)


def load_predictor(path: Path, device: torch.device, views: int | None = None, compile: bool = False) -> Predictor:
    """A training checkpoint, an exported `.pt`, or an `.onnx`, ready to classify prepared batches.
    `views`: test-time views, over the model's own (data.tte_views; an .onnx has its own fixed);
    `compile`: see `load`."""
    path = Path(path)
    if not path.is_file():
        raise EcvlError(f"{path}: no such model file")
    if path.suffix == ".onnx":
        if compile:
            raise EcvlError(f"{path}: an ONNX model runs in onnxruntime, not compiled by torch: drop --compile")
        return _onnx_predictor(path, views)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # empty, truncated or foreign: the checkpoint reader says which, and what else is there
        ckpt_io.load(path)
        raise
    if isinstance(state, dict) and state.get("format") == FORMAT:
        if "digest" in state and digest(state) != state["digest"]:  # an export from before digests has none
            raise EcvlError(
                f"{path}: its weights do not match the digest written at export: the file was changed "
                f"or damaged; export it again from its checkpoint ({state.get('source', 'unknown')})"
            )
        return _exported_predictor(state, device, views, compile)
    return _checkpoint_predictor(path, device, views, compile)


def _checkpoint_predictor(path: Path, device: torch.device, views: int | None, compile: bool) -> Predictor:
    from ecvl_fast.training.data import load_res
    from ecvl_fast.evaluation.metrics import predict_logits

    state, cfg = load_checkpoint(path)
    scorer = load_scorer(cfg, state, state["classes"], device, views, compile)
    crops = tte_split(cfg.data.tte_crops, cfg.data.tte_views if views is None else views)[1]

    @torch.no_grad()
    def probs(x):
        return predict_logits(scorer, x).softmax(1).cpu()

    return Predictor(
        state["classes"],
        cfg.data.res,
        load_res(cfg),
        probs,
        device,
        "checkpoint",
        crops,
        cfg.aug.interp,
    )


def _exported_predictor(d: dict, device: torch.device, views: int | None, compile: bool) -> Predictor:
    from ecvl_fast.config import ModelCfg
    from ecvl_fast.method import peft

    clip, _ = build_clip(ModelCfg(name=d["model_name"]), load_weights=False, res=d["res"])
    visual = clip.visual
    set_activation(visual, trained_quick_gelu(d, d["model_name"]))
    # an export from before LIFT's settings has text_features, no light module and one view
    weights = d.get("class_weights", d.get("text_features"))
    width = d.get("peft_dim", 0) or peft.saved_width(d["visual"])
    peft.apply(visual, d.get("peft", "none"), len(d["classes"]), width, d["model_name"])
    visual.load_state_dict(d["visual"])
    adapter = None
    if d["adapter"] is not None:
        adapter = Adapter(weights.shape[1], d["ratio"])
        adapter.load_state_dict(d["adapter"])
    own, crops = tte_split(d.get("tte_crops", "shifted"), views or d.get("tte_views", 1))
    scorer = Scorer(ImageTower(visual, d["logit_scale"]), weights, adapter, views=own, compile=compile)
    model = Classifier(scorer).to(device).eval()

    @torch.no_grad()
    def probs(x):
        with precision.autocast(device, precision.dtype("auto", device)):
            return model(x).float().cpu()

    return Predictor(d["classes"], d["res"], d["load_res"], probs, device, "exported", crops, d.get("interp", "linear"))


def _onnx_predictor(path: Path, views: int | None) -> Predictor:
    try:
        import onnxruntime as ort
    except ImportError:
        raise EcvlError(f"{path}: running ONNX needs onnxruntime: pip install 'ecvl-fast[onnx]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    if "ecvl_fast" not in props:
        raise EcvlError(f"{path}: not an ONNX file written by ecvl-fast export (no class names in it)")
    meta = json.loads(props["ecvl_fast"])
    fixed = meta.get("tte_views", 1)  # an export from before test-time views has one
    if views not in (None, fixed):
        raise EcvlError(
            f"{path}: an ONNX model's test-time views are fixed at export ({fixed}); export again with --tte {views}"
        )

    def probs(x):
        return torch.from_numpy(session.run(None, {"image": np.ascontiguousarray(x.float().cpu().numpy())})[0])

    crops = tte_split(meta.get("tte_crops", "shifted"), fixed)[1]
    return Predictor(
        meta["classes"],
        meta["res"],
        meta["load_res"],
        probs,
        torch.device("cpu"),
        "onnx",
        crops,
        meta.get("interp", "linear"),
    )


def load_scorer(
    cfg: Config,
    state: dict | None,
    classes: list[str],
    device: torch.device,
    views: int | None = None,
    compile: bool = False,
) -> Scorer:
    """A stage 1 or 2 checkpoint's classifier, or the zero-shot model `cfg.model.pretrained` when
    `state` is None; eval, predict and export all use it. `views`: test-time views (default: the
    config's data.tte_views); `compile`: Scorer's."""
    clip, tokenizer = build_clip(cfg.model, load_weights=state is None, res=cfg.data.res)  # a checkpoint brings its own
    net = ClipNet(clip)
    stage2 = state is not None and state.get("stage") == 2
    if stage2:
        two.add_light_module(cfg, net, len(classes), state["model"])  # its weights are in the checkpoint's "model"
    if state is not None:
        net.load_state_dict(state["model"])
        set_activation(net, trained_quick_gelu(state, cfg.model.name))
    net.to(device).eval()
    saved = state.get("text") if stage2 else None  # a stage-2 checkpoint's (its text tower was frozen)
    if isinstance(saved, torch.Tensor) and saved.shape[0] == len(classes):
        text = saved.to(device).float()
    else:  # a stage-1 checkpoint, CLIP's own weights, or a stage-2 one from before it kept them
        text = class_text_features(net, prompt_tokens(tokenizer, classes, cfg.model.templates).to(device))
    if not stage2:
        scale = trained_scale(cfg, 1) if state is not None else None  # zero-shot: CLIP's own
        return Scorer(
            net,
            text,
            scale=scale,
            views=tte_split(cfg.data.tte_crops, cfg.data.tte_views if views is None else views)[0],
            compile=compile,
        ).eval()
    st = two.modules(cfg, net, text)
    two.load(st, state)
    return two.scorer(cfg, st.to(device), views, compile).eval()
