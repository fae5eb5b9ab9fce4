"""The CLIP dual encoder (open_clip), class prompts, and zero-shot classification (eq. 6)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ecvl_fast import EcvlError, first_line
from ecvl_fast.config import ModelCfg

CONFIG_DIR = Path(__file__).parent.parent / "model_configs"  # the built-in small models' open_clip configs
SINGLE_TEMPLATE = ("a photo of a {}.",)


def _open_clip():
    import open_clip

    if "ecvl-tiny-vit" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def templates(kind: str) -> tuple[str, ...]:
    if kind == "single":
        return SINGLE_TEMPLATE
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def build_clip(cfg: ModelCfg, load_weights: bool = True):
    """(model, tokenizer). `pretrained`: "none", a local file, or an open_clip tag. Callers that
    restore an ecvl-fast checkpoint pass load_weights=False and skip fetching those weights."""
    oc = _open_clip()
    if cfg.name not in oc.list_models():
        raise EcvlError(f"unknown open_clip model {cfg.name!r} (e.g. RN50, ViT-B-32, ecvl-tiny-vit)")
    pretrained = None if cfg.pretrained in ("", "none") or not load_weights else cfg.pretrained
    looks_like_path = pretrained is not None and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")))
    if looks_like_path and not Path(pretrained).is_file():
        raise EcvlError(f"{pretrained}: no such pretrained checkpoint")
    try:
        # open_clip warns "initialized randomly" whenever it loads no weights, also where they come
        # from a checkpoint next; `train` says it once, where it matters (`random_weights_warning`)
        with _quiet_logging(pretrained is None):
            model = oc.create_model(cfg.name, pretrained=pretrained)
    except Exception as e:  # hub unreachable, unknown tag, incompatible file
        raise EcvlError(f"could not load {cfg.name} weights {pretrained!r}: {first_line(e)}") from None
    return model, oc.get_tokenizer(cfg.name)


@contextlib.contextmanager
def _quiet_logging(quiet: bool):
    if not quiet:
        yield
        return
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


BUILT_IN = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))  # the small models made to train from scratch


def random_weights_warning(cfg: ModelCfg) -> str | None:
    """A warning for training a model larger than the built-in small ones from random weights."""
    if cfg.pretrained not in ("", "none") or cfg.name in BUILT_IN:
        return None
    return (f"warning: {cfg.name} trains from random weights (model.pretrained = \"none\"): CLIP's accuracy comes "
            f"from its pretraining, so expect a weak model; set model.pretrained to an open_clip weights file, or "
            f"use a built-in small model ({', '.join(BUILT_IN)})")


def prompt_tokens(tokenizer, classnames: list[str], kind: str = "single") -> torch.Tensor:
    """[T, K, L] token ids: every template for every class."""
    return torch.stack([tokenizer([t.format(c) for c in classnames]) for t in templates(kind)])


class ClipNet(nn.Module):
    """Normalised image and text features; what DDP wraps, so its forward must use every trainable param."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None):
        img = F.normalize(self.clip.encode_image(images), dim=-1)
        txt = None if tokens is None else F.normalize(self.clip.encode_text(tokens), dim=-1)
        return img, txt

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()


class Adapter(nn.Module):
    """eq. 7: f* = lambda * ReLU(W^T f + b) + (1 - lambda) * f, BALLAD's residual adapter (lambda 0.2)."""

    def __init__(self, dim: int, ratio: float = 0.2):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.ratio = ratio

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.ratio * F.relu(self.fc(f)) + (1 - self.ratio) * f


def adapted_features(features: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    """The image features stage 2 classifies, for training and eval alike: eq. 7, then L2
    normalisation (eq. 6 takes cosines). Without an adapter (stage 1), the features as they are."""
    return features if adapter is None else F.normalize(adapter(features.float()), dim=-1)


@torch.no_grad()
def class_text_features(net: ClipNet, tokens: torch.Tensor) -> torch.Tensor:
    """[K, D]: per class, the normalised mean of its normalised template embeddings."""
    t, k, length = tokens.shape
    feats = F.normalize(net.clip.encode_text(tokens.reshape(t * k, length)).float(), dim=-1)
    return F.normalize(feats.reshape(t, k, -1).mean(0), dim=-1)


def zero_shot_logits(image_features: torch.Tensor, text_features: torch.Tensor, scale) -> torch.Tensor:
    """eq. 6: cosine similarity times the logit scale (softmax of these gives p(y|x))."""
    return scale * image_features.float() @ text_features.float().T


class CosineHead(nn.Module):
    """LIFT's classifier: scale * cos(f, w_k), each w_k initialised from class k's text features,
    so that it starts from the zero-shot classifier (eq. 6 at this scale). Scale 25: LIFT's."""

    def __init__(self, text_features: torch.Tensor, scale: float = 25.0):
        super().__init__()
        self.weight = nn.Parameter(text_features.detach().clone().float())
        self.scale = scale

    def weights(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=-1)


def tte_views(images: torch.Tensor, views: int) -> list[torch.Tensor]:
    """Test-time ensembling's inputs, the first `views` of: the image as evaluated, its mirror,
    then the four corner crops of the image enlarged by res * 24/224, then their mirrors. One view
    is plain evaluation. LIFT's test transform (Resize(res + 24), then FiveCrop) cuts its crops
    from a larger decode and so sees past the centre crop's edge; these are cut from the prepared
    image itself (a ~0.9x zoom, shifted), so that predict and an ONNX export take the same input."""
    res = int(images.shape[-1])  # a constant where ONNX export traces it: the resolution is fixed
    out = [images, images.flip(-1)][:views]
    if views > 2:
        grow = max(1, round(res * 24 / 224))
        big = F.interpolate(images, size=(res + grow, res + grow), mode="bilinear", align_corners=False)
        corners = [big[..., y:y + res, x:x + res] for y in (0, grow) for x in (0, grow)]
        out += (corners + [c.flip(-1) for c in corners])[:views - 2]
    return out


class Scorer(nn.Module):
    """Prepared images -> class logits, for eval, predict and export alike: the image tower (with
    its light module, if any), the stage-2 adapter (eq. 7, if any), then eq. 6 against the class
    weights [K, D] (the text features, or a trained cosine head's) at `scale` (None: CLIP's logit
    scale), averaged over `views` test-time views."""

    def __init__(self, net: ClipNet, weights: torch.Tensor, adapter: nn.Module | None = None,
                 scale: float | None = None, views: int = 1):
        super().__init__()
        self.net, self.adapter, self.scale, self.views = net, adapter, scale, views
        self.register_buffer("weights", weights.detach().float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scale = self.net.logit_scale if self.scale is None else self.scale
        logits = [zero_shot_logits(adapted_features(self.net(x)[0], self.adapter), self.weights, scale)
                  for x in tte_views(images, self.views)]
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)


class StageTwo(nn.Module):
    """What stage 2 trains, as one module for DDP: a light module inside the otherwise frozen image
    tower, the residual adapter (eq. 7), a cosine head; any of them may be absent. Returns the
    adapted, normalised features and the class weights they are scored against."""

    def __init__(self, net: ClipNet, text: torch.Tensor, adapter: Adapter | None, head: CosineHead | None,
                 chunks: int = 1):
        super().__init__()
        self.net, self.adapter, self.head, self.chunks = net, adapter, head, chunks
        self.register_buffer("text", text.detach().float())
        self.tuned = any(p.requires_grad for p in net.parameters())  # a light module: the tower needs gradients

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.tuned and torch.is_grad_enabled()):  # frozen tower: no graph to keep
            feats = torch.cat([self.net(x)[0] for x in images.chunk(self.chunks)])
        return adapted_features(feats, self.adapter), (self.text if self.head is None else self.head.weights())

    def trained(self) -> dict[str, torch.Tensor]:
        """Every trained tensor (what must stay finite)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


class ImageTower(nn.Module):
    """ClipNet's image side alone, what an exported classifier keeps: normalised image features,
    and eq. 6's scale as a fixed number."""

    def __init__(self, visual: nn.Module, logit_scale: float):
        super().__init__()
        self.visual = visual
        self.register_buffer("scale", torch.tensor(float(logit_scale)))

    def forward(self, images: torch.Tensor, tokens=None):
        return F.normalize(self.visual(images), dim=-1), None

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.scale
