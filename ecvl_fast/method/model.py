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


def check_name(name: str):
    """open_clip, once `name` is known to be one of its models (or a built-in small one)."""
    oc = _open_clip()
    if name not in oc.list_models():
        import difflib

        close = difflib.get_close_matches(name, oc.list_models(), n=3)
        raise EcvlError(
            f"unknown open_clip model {name!r} ("
            + (
                f"did you mean {', '.join(close)}?"
                if close
                else "e.g. RN50-quickgelu, ViT-B-16-quickgelu, ecvl-small-rn, ecvl-tiny-vit"
            )
            + ")"
        )
    return oc


def check_forward(net: nn.Module, tokens: torch.Tensor, res: int, name: str) -> None:
    """One forward of two blank images at `res` (and two prompts), before any work: a tower that
    cannot take the run's images fails here in one line, not in the first step."""
    from ecvl_fast import first_line

    device, was = next(net.parameters()).device, net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(2, 3, res, res, device=device), tokens[:2])
    except Exception as e:
        raise EcvlError(
            f"model {name} cannot take data.res = {res} px images ({first_line(e)}); "
            f"choose another data.res or model.name"
        ) from None
    finally:
        net.train(was)


def _is_path(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def is_torchscript(path: str | Path) -> bool:
    """OpenAI's own CLIP files are TorchScript archives: a zip holding compiled code (`*/code/`)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist()[:200])
    except (OSError, zipfile.BadZipFile):
        return False


def activation(cfg: ModelCfg) -> tuple[bool, str]:
    """(QuickGELU?, why). OpenAI trained CLIP with QuickGELU, and open_clip builds `RN50` and
    `ViT-B-16` with nn.GELU (its `-quickgelu` names and its pretrained table say which weights need
    which). Weights in the wrong network load without an error and lose accuracy, so: the model's
    own config (`RN50-quickgelu`), an open_clip tag trained with it (`openai`), or OpenAI's own
    TorchScript file builds QuickGELU. A plain state dict cannot say; its model name decides.
    Decided from the config alone, so a resumed or exported model is rebuilt as it was trained."""
    oc = _open_clip()
    if _own_quick_gelu(cfg.name):
        return True, f"{cfg.name}'s own config"
    p = cfg.pretrained
    if p in ("", "none"):
        return False, f"{cfg.name}'s own config"
    if not _is_path(p):
        from open_clip.pretrained import get_pretrained_cfg

        if get_pretrained_cfg(cfg.name, p).get("quick_gelu"):
            return True, f"the {p!r} weights were trained with it"
        return False, f"{cfg.name}'s own config"
    if Path(p).is_file() and is_torchscript(p):
        return True, f"{p} is OpenAI's TorchScript format"
    quick_name = f"{cfg.name}-quickgelu"
    hint = (
        f" (OpenAI's weights as a state dict: use model.name = {quick_name!r})"
        if quick_name in oc.list_models()
        else ""
    )
    return False, f"a state dict cannot say, so the model name decides{hint}"


def activation_line(cfg: ModelCfg) -> str:
    quick, why = activation(cfg)
    return f"activation: {'QuickGELU' if quick else 'GELU'} in both towers ({why})"


def quick_gelu_of(module: nn.Module) -> bool:
    """Whether a built model runs QuickGELU (what checkpoints and exports record)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in module.modules())


def trained_quick_gelu(state: dict, name: str) -> bool:
    """The activation a checkpoint's network ran: as it records, or, for one written before the
    record (2026-12-05), what was built then: the model config's own (open_clip only warned)."""
    return bool(state["quick_gelu"]) if "quick_gelu" in state else _own_quick_gelu(name)


def _own_quick_gelu(name: str) -> bool:
    return bool((_open_clip().get_model_config(name) or {}).get("quick_gelu"))


def set_activation(model: nn.Module, quick: bool) -> None:
    """Make every GELU in `model` QuickGELU (or the reverse), in place: neither has weights, so a
    network built one way runs a checkpoint trained the other way as it was trained."""
    from open_clip.transformer import QuickGELU

    want, other = (QuickGELU, nn.GELU) if quick else (nn.GELU, QuickGELU)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, other) and not isinstance(child, want):
                setattr(parent, name, want())


def native_res(name: str) -> int:
    size = (_open_clip().get_model_config(name) or {}).get("vision_cfg", {}).get("image_size", 224)
    return size if isinstance(size, int) else size[0]


def build_clip(cfg: ModelCfg, load_weights: bool = True, res: int | None = None):
    """(model, tokenizer). `pretrained`: "none", a local file, or an open_clip tag. Callers that
    restore an ecvl-fast checkpoint pass load_weights=False and skip fetching those weights.
    `res`: the run's input size; the tower is built for it (a ViT's position embedding, a ResNet's
    attention pool), so a config cannot hand a model images it was not built for. A checkpoint
    loaded into it next sets the activation it was trained with (`set_activation`)."""
    oc = check_name(cfg.name)
    pretrained = None if cfg.pretrained in ("", "none") or not load_weights else cfg.pretrained
    if pretrained is not None and _is_path(pretrained) and not Path(pretrained).is_file():
        raise EcvlError(f"{pretrained}: no such pretrained checkpoint")
    kwargs = {"force_quick_gelu": activation(cfg)[0]}
    if res and res != native_res(cfg.name):
        kwargs["force_image_size"] = res
    scripted = pretrained is not None and _is_path(pretrained) and is_torchscript(pretrained)
    if pretrained is not None and not _is_path(pretrained):
        check_weights_reachable(cfg.name, pretrained)
    try:
        # open_clip warns "initialized randomly" whenever it loads no weights, also where they come
        # from a checkpoint next; `train` says it once, where it matters (`random_weights_warning`)
        with _quiet_logging(pretrained is None or scripted):
            model = oc.create_model(cfg.name, pretrained=None if scripted else pretrained, **kwargs)
        if scripted:
            _load_torchscript(model, pretrained)
    except Exception as e:  # hub unreachable, unknown tag, incompatible file
        raise EcvlError(f"could not load {cfg.name} weights {pretrained!r}: {first_line(e)}") from None
    return model, oc.get_tokenizer(cfg.name)


def check_weights_reachable(name: str, tag: str) -> None:
    """An open_clip tag's weights are in the local cache, or their host answers; else one line at
    once (the hub's client retries an unreachable host for about a minute before it gives up)."""
    import os
    import socket
    from urllib.parse import urlparse

    from open_clip.pretrained import get_pretrained_cfg

    found = get_pretrained_cfg(name, tag)
    if not found:
        return  # an unknown tag: open_clip's own error names the known ones
    hub, url = found.get("hf_hub", ""), found.get("url", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = (filename, filename.rsplit(".", 1)[0] + ".safetensors", "open_clip_model.safetensors")
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in names):
            return
        offline, host, where = constants.HF_HUB_OFFLINE, urlparse(constants.ENDPOINT), f"hf.co/{repo}"
    else:
        if (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file():
            return
        offline, host, where = False, urlparse(url), url
    try:
        if offline:
            raise OSError("HF_HUB_OFFLINE is set")
        socket.create_connection(
            (host.hostname, host.port or (443 if host.scheme == "https" else 80)), timeout=5
        ).close()
    except OSError as e:
        raise EcvlError(
            f"model.pretrained = {tag!r}: {name}'s weights are not in the local cache and {host.hostname} "
            f"cannot be reached ({first_line(e)}); pass a local weights file, --set "
            f"model.pretrained=/path/to/weights (fetched from {where} on a machine with a network)"
        ) from None


def _load_torchscript(model, path: str) -> None:
    """OpenAI's TorchScript archive: its tensors, into the open_clip model (same names). open_clip
    reads weights with torch.load(weights_only=True), which refuses TorchScript; torch.jit.load
    reads the archive's tensors and runs none of its code."""
    from open_clip.factory import resize_pos_embed

    skip = {"input_resolution", "context_length", "vocab_size"}  # OpenAI's archives' scalars
    skip |= {name for name, _ in model.named_buffers()} - set(model.state_dict())  # an archive keeps every buffer
    state = {k: v for k, v in torch.jit.load(path, map_location="cpu").state_dict().items() if k not in skip}
    resize_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


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
    return (
        f'warning: {cfg.name} trains from random weights (model.pretrained = "none"): CLIP\'s accuracy comes '
        f"from its pretraining, so expect a weak model; set model.pretrained to an open_clip weights file, or "
        f"use a built-in small model ({', '.join(BUILT_IN)})"
    )


def prompt_tokens(tokenizer, classnames: list[str], kind: str = "single") -> torch.Tensor:
    """[T, K, L] token ids: every template for every class."""
    return torch.stack([tokenizer([t.format(c) for c in classnames]) for t in templates(kind)])


def used_length(tokens: torch.Tensor) -> int:
    """Positions up to the longest prompt's end-of-text token (the highest id: open_clip's argmax
    pool). A sync point where `tokens` live on a GPU: call it once per set of prompts."""
    return int(tokens.argmax(dim=-1).max()) + 1


def encode_text(clip, tokens: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """open_clip's `encode_text`, run on the prompts' used length only. CLIP's text tower is causal
    and pooled at the end-of-text token, so the padding after the longest prompt's end changes
    nothing it returns; a class prompt is ~10 of the 77 positions, so this is the same features at a
    fraction of the cost. Other text towers (no causal mask, another pooling) run as they are.
    `n`: `used_length` of these prompts or of a set they are drawn from (default: computed here)."""
    if (
        getattr(clip, "attn_mask", None) is None
        or getattr(clip, "text_pool_type", None) != "argmax"
        or not hasattr(clip, "token_embedding")
    ):
        return clip.encode_text(tokens)
    n = used_length(tokens) if n is None else n
    tokens = tokens[:, :n]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:n].to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if clip.text_projection is None:
        return x
    return clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection


class ClipNet(nn.Module):
    """Normalised image and text features; what DDP wraps, so its forward must use every trainable param."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.text_len: int | None = None  # `used_length` of every prompt the forward will see (no sync per step)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None):
        img = F.normalize(self.clip.encode_image(images), dim=-1)
        txt = None if tokens is None else F.normalize(encode_text(self.clip, tokens, self.text_len), dim=-1)
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
    feats = F.normalize(encode_text(net.clip, tokens.reshape(t * k, length)).float(), dim=-1)
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
        corners = [big[..., y : y + res, x : x + res] for y in (0, grow) for x in (0, grow)]
        out += (corners + [c.flip(-1) for c in corners])[: views - 2]
    return out


def tte_split(crops: str, views: int) -> tuple[int, int]:
    """Test-time views -> (views the Scorer cuts from each prepared image, views prepared per image
    before it). "shifted": all cut by the Scorer (`tte_views`); "five": LIFT's five crops, which need
    the whole image, prepared by the eval loader and predict (loaders/draws.py, `five_crop_boxes`)."""
    if crops != "five":
        return views, 1
    if views not in (1, 5):
        raise EcvlError(f'{views} test-time views: LIFT\'s five crops (data.tte_crops = "five") are 5, or 1 for none')
    return 1, views


class Scorer(nn.Module):
    """Prepared images -> class logits, for eval, predict and export alike: the image tower (with
    its light module, if any), the stage-2 adapter (eq. 7, if any), then eq. 6 against the class
    weights [K, D] (the text features, or a trained cosine head's) at `scale` (None: CLIP's logit
    scale), averaged over test-time views: `views` cut from each image [N, C, H, W], or the views
    of an input prepared with them [N, V, C, H, W] (`tte_split`).

    `compile`: the whole of it compiled as one frozen graph (`compile_frozen`; inference only, one
    compilation per batch shape), for `predict --compile` and `bench infer --compile`."""

    def __init__(
        self,
        net: ClipNet,
        weights: torch.Tensor,
        adapter: nn.Module | None = None,
        scale: float | None = None,
        views: int = 1,
        compile: bool = False,
    ):
        super().__init__()
        self.net, self.adapter, self.scale, self.views = net, adapter, scale, views
        self.register_buffer("weights", weights.detach().float())
        self.score = compile_frozen(self._logits) if compile else self._logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.score(images)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        scale = self.net.logit_scale if self.scale is None else self.scale
        inputs = images.unbind(1) if images.dim() == 5 else tte_views(images, self.views)
        logits = [zero_shot_logits(adapted_features(self.net(x)[0], self.adapter), self.weights, scale) for x in inputs]
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)


class StageTwo(nn.Module):
    """What stage 2 trains, as one module for DDP: a light module inside the otherwise frozen image
    tower, the residual adapter (eq. 7), a cosine head; any of them may be absent. Returns the
    adapted, normalised features and the class weights they are scored against."""

    def __init__(
        self,
        net: ClipNet,
        text: torch.Tensor,
        adapter: Adapter | None,
        head: CosineHead | None,
        chunks: int = 1,
        compile: bool = False,
    ):
        super().__init__()
        self.net, self.adapter, self.head, self.chunks = net, adapter, head, chunks
        self.register_buffer("text", text.detach().float())
        self.tuned = any(p.requires_grad for p in net.parameters())  # a light module: the tower needs gradients
        self.encode = self._features
        self.compiled = compile and not self.tuned
        if self.compiled:  # the frozen tower on its own, for inference: no graph to keep for gradients
            self.encode = compile_frozen(self._features)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.tuned and torch.is_grad_enabled()):  # frozen tower: no graph to keep
            feats = torch.cat([self.encode(x) for x in images.chunk(self.chunks)])
        return adapted_features(feats, self.adapter), (self.text if self.head is None else self.head.weights())

    def trained(self) -> dict[str, torch.Tensor]:
        """Every trained tensor (what must stay finite)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


def compile_frozen(fn):
    """`fn` (a frozen tower's forward, or a whole classifier's) compiled on its own, at fixed shapes,
    run without gradients: Inductor's freezing folds the weights in as constants, so their casts to
    the compute dtype and the batch norms' folding into the convolutions happen once, at compile
    time; on a GPU its kernels replay as CUDA graphs, and each output is copied out of the graph's
    (small: features or logits) before the next replay overwrites it. The weights must not change
    after the first call. A tower that trains (a light module in it) is not compiled so."""
    import torch._inductor.config as inductor_config

    options = {"triton.cudagraphs": True} if torch.cuda.is_available() else None
    compiled = torch.compile(fn, dynamic=False, options=options)

    def frozen(*args):
        # Dynamo reads `freezing` while it traces, before torch.compile's options apply (they reach
        # Inductor only): set as an option, the weights stay graph inputs and nothing is folded
        with torch.no_grad(), inductor_config.patch(freezing=True):
            out = compiled(*args)
        return out.clone() if out.is_cuda else out

    return frozen


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
