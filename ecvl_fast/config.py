"""Run configuration: one frozen dataclass per concern, composed into `Config`.

Sources, later ones winning: the defaults here, a TOML file (`--config`), `--set section.key=value`.
An unknown section or key, or a value of the wrong type, is an error before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ecvl_fast import EcvlError


@dataclass(frozen=True)
class DataCfg:
    path: str = "data/mnist-lt"
    res: int = 224
    load_res: int = (
        0  # evaluation's Resize(S) before CenterCrop(res), and the decode size; 0 = res (<= 64 px) or res * 8/7
    )
    batch_size: int = 256  # global: split evenly over DDP ranks
    workers: int = 2  # ffcv reader threads
    dali_threads: int = 0  # DALI's thread pool; 0 = 2 x workers (its per-operator waits overlap)
    prefetch: int = 2  # batches a feeder thread builds ahead of the step (0 = synchronous)
    dali_queue: int = 0  # batches in DALI at once (its pipelined executor when > 1); 0 = 2 on a GPU, 1 on a CPU
    eval_split: str = "test"
    tte_views: int = 1  # test-time ensembling (LIFT): 1 = plain; 2 + mirror; up to 10 with shifted crops and theirs
    tte_crops: str = (
        "shifted"  # "shifted" (views cut from the prepared image) or "five": LIFT's Resize(res + 24/224 res)
    )
    #                             then FiveCrop(res) from the whole image (tte_views 5, or 1 for none)
    eval_resize: str = "auto"  # evaluation's Resize(S) (and so the decode size) when load_res is 0: "auto" (res
    #                            up to 64 px, else 8/7 res) or "lift+": res + res // 7 (LIFT+'s test resize; 256 at 224)


@dataclass(frozen=True)
class ModelCfg:
    name: str = "RN50"
    pretrained: str = "none"  # an open_clip tag, a local checkpoint path, or "none" (random init)
    templates: str = "single"  # "single" ("a photo of a {}.") or "openai" (open_clip's 80, averaged)
    compile: bool = False


@dataclass(frozen=True)
class AugCfg:
    k: int = 2  # RandAugment ops per sample (eq. 10)
    beta: float = 0.97  # momentum of the per-sample loss EMA (eq. 8; BCL)
    m_norm: str = "bcl"  # eq. 9: "bcl" (z / max|z| / 2 + 1/2) or "rank" (the EMA's percentile rank)
    # ECVL+ (docs/study-ecvl-plus.md); the defaults are the paper's memory
    m_source: str = "dcvl"  # the per-sample loss the EMA tracks: "dcvl" (eq. 8), "ce" (prompt CE),
    #                         "frequency": no memory, M from the class's size alone (the control), or
    #                         "lol": Ahn et al.'s level of learning per class (needs m_scope "class",
    #                         m_direction "easy"): a class classified right more than lol_accept of the
    #                         time goes a level up at epoch end, else down; M = level / lol_levels
    m_scope: str = "sample"  # "sample" (eq. 9) or "class": one M per class, its rank by mean EMA
    m_direction: str = "hard"  # "hard": poorly learned (or rare) -> high M; "easy": the reverse
    lol_accept: float = 0.6  # Ahn et al.'s code default (accept_rate)
    lol_levels: int = 10  # their max_d is 30 over 200 epochs; stage 2 here runs 5-10 epochs
    crop_min_scale: float = 0.5  # BALLAD's RandomResizedCrop scale (0.5, 1)
    # Stage 2's crop. LIFT+'s minimalist augmentation (Shi et al., arXiv 2504.13282): square crops, no
    # flip, bicubic, the minimum scale rising from crop_min_scale to 1 over stage 2 (1 - sqrt(1 - t^2))
    crop_schedule: str = "constant"  # "constant" (crop_min_scale) or "lift+" (rising, convex)
    crop_square: bool = False  # square crops (LIFT+) instead of torchvision's aspect 3/4..4/3
    flip: bool = True  # a random horizontal flip
    interp: str = "linear"  # the crop's resize filter: "linear" or "cubic" (LIFT+'s bicubic); evaluation too
    crop_m: float = 0.0  # the memory-driven crop: each sample's minimum scale is the schedule's value plus
    #                      crop_m * (M_i - mean M), in [0.01, 1]; > 0: a high-M sample is cropped more gently
    crop_m_shuffle: bool = False  # its no-memory control: the same per-epoch scales, dealt to samples at random


@dataclass(frozen=True)
class Stage1Cfg:
    epochs: int = 10  # 0: no stage 1; stage 2 starts from model.pretrained (LIFT's single-stage form)
    loss: str = "clip"  # "clip" (eqs. 4-5) or "prompt-ce" (BALLAD's official phase A)
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_epochs: float = 1.0
    ce_scale: float = 100.0  # BALLAD's logit scale for prompt-ce
    accum_steps: int = 1  # micro-batches per optimizer step (exact; the CLIP loss caches features)


@dataclass(frozen=True)
class Stage2Cfg:
    epochs: int = 10  # BALLAD phase B
    lr: float = 1e-3  # AdamW (BALLAD's official phase B uses SGD at 0.2)
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    ratio: float = 0.2  # eq. 7's lambda (BALLAD's adapter ratio)
    temperature: float = 0.2  # L_DCVL's NT-Xent temperature (BCL)
    dcvl_weight: float = 1.0  # 0 with randaug: L_DCVL still feeds the bank (M) but adds no gradient
    ce_scale: float = 100.0
    randaug: bool = True  # memory-driven RandAugment (eq. 10)
    randaug_m: float = -1.0  # < 0: M from the memory (eq. 9); in [0, 1]: this M for every sample (ablation)
    init: str = ""  # stage-1 checkpoint; "" = run.out/best.pt; "none" = model.pretrained as is
    logit_adjust: float = 0.0  # tau of the logit-adjusted prompt CE (Menon et al. 2021; LIFT: 1.0); 0 = plain CE
    # LIFT's recipe (Shi et al., ICML 2024; method/peft.py): what trains besides (or instead of) the adapter
    adapter: bool = True  # eq. 7's residual adapter on the image features (BALLAD)
    peft: str = "none"  # a light module in the frozen image tower: "adaptformer", "lora" (ViT), "bitfit";
    #                     "auto": LIFT's default for the tower (AdaptFormer on a ViT, BitFit on a ResNet)
    peft_dim: int = 0  # its bottleneck / rank; 0 = LIFT's rule: 2^floor(log2(K / (2 x blocks))), LoRA K / (4 x blocks)
    head: str = (
        "prompt"  # "prompt": the fixed class text features at ce_scale; "cosine": a trained cosine head from them
    )
    head_scale: float = 25.0  # the cosine head's scale (LIFT's)
    sampling: str = "balanced"  # "balanced" (eq. 12, BALLAD) or "instance" (LIFT: the logit-adjusted loss balances)
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9; LIFT: lr 0.01, weight decay 5e-4)
    views: int = 2  # augmented views per image and step: 2 for L_DCVL (eq. 11); 1 where nothing reads a second (LIFT)
    accum_steps: int = 1  # chunks the frozen encoders run in (their activations fill the GPU)


@dataclass(frozen=True)
class DistCfg:
    backend: str = "auto"  # nccl on GPU, gloo on CPU


@dataclass(frozen=True)
class RunCfg:
    out: str = ""  # the run folder; "" = runs/<dataset>-<model> (two datasets never share one by default)
    seed: int = 0
    device: str = "auto"  # "auto", "cpu" or "cuda"
    log_every: int = 20  # steps between host syncs for logging (and for agreeing on a stop signal)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at epoch ends only)
    stop_grace_s: float = 60.0  # after SIGTERM/SIGUSR1, leave anyway after this long (a dead peer)
    report_to: str = ""  # also write the scalars to "tensorboard" (<run folder>/tb), "wandb" (offline with
    #                    WANDB_MODE=offline), or both: "tensorboard,wandb" or "all" (open_clip's --report-to)
    lines_per_epoch: int = (
        20  # when stdout is not a terminal: about this many progress lines per epoch (0: epoch lines only)
    )
    best_metric: str = "all"  # the val metric that picks best.pt: "all", "macro_f1", "few", "medium" or "many"
    report: str = "last"  # the checkpoint the final report (metrics.json) evaluates: "last" or "best" (on val)
    limit_steps: int = 0  # train at most this many steps per epoch (0: the whole epoch); `train --trial` sets it
    limit_eval: int = (
        0  # evaluate at most this many images per split, a seeded subset (0: all); `train --trial` sets it
    )
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp16" (+ GradScaler) or "fp32"


@dataclass(frozen=True)
class Config:
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    aug: AugCfg = field(default_factory=AugCfg)
    stage1: Stage1Cfg = field(default_factory=Stage1Cfg)
    stage2: Stage2Cfg = field(default_factory=Stage2Cfg)
    dist: DistCfg = field(default_factory=DistCfg)
    run: RunCfg = field(default_factory=RunCfg)

    def __post_init__(self):
        if not self.run.out:  # frozen: set once, here, so every way of building a Config agrees
            object.__setattr__(self, "run", dataclasses.replace(self.run, out=default_out(self)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_out(cfg: Config) -> str:
    """The run folder of a config that names none: from the data and the model."""
    return f"runs/{Path(cfg.data.path).name or 'data'}-{cfg.model.name}"


CHOICES = {
    ("model", "templates"): ("single", "openai"),
    ("stage1", "loss"): ("clip", "prompt-ce"),
    ("aug", "m_norm"): ("bcl", "rank"),
    ("aug", "m_source"): ("dcvl", "ce", "frequency", "lol"),
    ("aug", "m_scope"): ("sample", "class"),
    ("aug", "m_direction"): ("hard", "easy"),
    ("data", "eval_split"): ("test", "val"),
    ("data", "tte_crops"): ("shifted", "five"),
    ("data", "eval_resize"): ("auto", "lift+"),
    ("aug", "crop_schedule"): ("constant", "lift+"),
    ("aug", "interp"): ("linear", "cubic"),
    ("stage2", "peft"): ("none", "adaptformer", "lora", "bitfit", "auto"),
    ("stage2", "head"): ("prompt", "cosine"),
    ("stage2", "sampling"): ("balanced", "instance"),
    ("stage2", "optimizer"): ("adamw", "sgd"),
    ("dist", "backend"): ("auto", "nccl", "gloo"),
    ("run", "device"): ("auto", "cpu", "cuda"),
    ("run", "precision"): ("auto", "bf16", "fp16", "fp32"),
    ("run", "report_to"): ("", "tensorboard", "wandb", "tensorboard,wandb", "wandb,tensorboard", "all"),
    ("run", "best_metric"): ("all", "macro_f1", "few", "medium", "many"),
    ("run", "report"): ("last", "best"),
}


# Lower bounds per setting: below them a run would train nothing, or fail after the work began.
AT_LEAST = {
    ("data", "batch_size"): 1,
    ("data", "res"): 1,
    ("stage1", "epochs"): 0,
    ("stage2", "epochs"): 1,
    ("stage1", "accum_steps"): 1,
    ("stage2", "accum_steps"): 1,
    ("data", "dali_queue"): 0,
    ("aug", "lol_levels"): 1,
    ("run", "log_every"): 1,
    ("stage2", "logit_adjust"): 0.0,
    ("data", "tte_views"): 1,
    ("stage2", "views"): 1,
    ("stage2", "peft_dim"): 0,
    ("run", "lines_per_epoch"): 0,
    ("run", "limit_steps"): 0,
    ("run", "limit_eval"): 0,
}
AT_MOST = {("data", "tte_views"): 10, ("stage2", "views"): 2}
POSITIVE = {("stage1", "lr"), ("stage2", "lr"), ("stage2", "head_scale")}


def _coerce(where: str, typ, value):
    """Check a TOML value, or parse a `--set` string, against the field's type."""
    if isinstance(value, str) and typ is not str:
        try:
            value = {"true": True, "false": False}[value.lower()] if typ is bool else typ(value)
        except (KeyError, ValueError):
            raise EcvlError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise EcvlError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


REMOVED = {
    ("aug", "randaug"): "stage 1 has no momentum bank, so it has no memory-driven RandAugment; "
    "stage 2 has it (stage2.randaug)",
}


# Old spellings still read (a saved run's config.toml, a checkpoint's config): (section, key) ->
# the setting it now is, as a function of the old value.
RENAMED = {
    ("run", "tensorboard"): lambda on: (
        "run",
        "report_to",
        "tensorboard" if _coerce("run.tensorboard", bool, on) else "",
    ),
}


def reports_to(cfg: Config) -> set[str]:
    """The trackers run.report_to names."""
    value = cfg.run.report_to
    return {"tensorboard", "wandb"} if value == "all" else {v for v in value.split(",") if v}


def _merge(cfg: Config, section: str, key: str, value, where: str) -> Config:
    if (section, key) in RENAMED:
        section, key, value = RENAMED[section, key](value)
    if (section, key) in REMOVED:
        raise EcvlError(f"{where}: {section}.{key} is not a setting: {REMOVED[section, key]}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise EcvlError(f"{where}: unknown config section {section!r} (known: {', '.join(sections)})")
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise EcvlError(f"{where}: unknown key {section}.{key} (known: {', '.join(hints)})")
    value = _coerce(where, hints[key], value)
    low = AT_LEAST.get((section, key))
    if low is not None and value < low:  # settings under which a run would train nothing
        raise EcvlError(f"{where}: {section}.{key} must be at least {low}, not {value}")
    high = AT_MOST.get((section, key))
    if high is not None and value > high:
        raise EcvlError(f"{where}: {section}.{key} must be at most {high}, not {value}")
    if (section, key) in POSITIVE and not (value > 0 and math.isfinite(value)):  # also NaN, inf and 1e400
        raise EcvlError(f"{where}: {section}.{key} must be a finite number greater than 0, not {value}")
    if (section, key) == ("aug", "lol_accept") and not 0 <= value < 1:
        raise EcvlError(f"{where}: {section}.{key} is an accuracy in [0, 1), not {value}")
    allowed = CHOICES.get((section, key))
    if allowed and value not in allowed:
        raise EcvlError(f"{where}: {section}.{key} must be one of {', '.join(allowed)}, not {value!r}")
    derived = cfg.run.out == default_out(cfg)
    cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{key: value})})
    if derived and section in ("data", "model"):  # a derived folder follows the data and the model
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=""))
    return cfg


def from_dict(d: dict, where: str = "config", base: Config | None = None, complete: bool = True) -> Config:
    """`complete`: nothing more will be merged, so the settings that go together are checked."""
    cfg = base or Config()
    for section, values in d.items():
        if not isinstance(values, dict):
            raise EcvlError(f"{where}: {section!r} must be a [section] table")
        for key, value in values.items():
            cfg = _merge(cfg, section, key, value, where)
    return check_together(cfg) if complete else cfg


def check_together(cfg: Config) -> Config:
    """The settings that only make sense together (each one alone is checked by _merge)."""
    a, fixed = cfg.aug, cfg.stage2.randaug_m
    if a.m_source == "lol" and (a.m_scope, a.m_direction) != ("class", "easy"):
        raise EcvlError(
            f'aug.m_source = "lol" gives one M per class that rises as the class is learned: '
            f'set aug.m_scope = "class" and aug.m_direction = "easy" (not {a.m_scope!r}, {a.m_direction!r})'
        )
    if fixed > 1:
        raise EcvlError(f"stage2.randaug_m={fixed}: a fixed M lies in [0, 1] (< 0: the memory)")
    if cfg.data.tte_crops == "five" and cfg.data.tte_views not in (1, 5):
        raise EcvlError(
            f'data.tte_crops = "five" averages LIFT\'s five crops: data.tte_views = 5 (or 1 for none), '
            f"not {cfg.data.tte_views}"
        )
    s = cfg.stage2
    if not s.adapter and s.peft == "none" and s.head == "prompt":
        raise EcvlError(
            'stage 2 would train nothing: stage2.adapter = false with stage2.peft = "none" and '
            'stage2.head = "prompt"; set one of them'
        )
    if not -1 <= a.crop_m <= 1:
        raise EcvlError(f"aug.crop_m={a.crop_m}: the memory moves a crop's minimum scale by at most 1 (in [-1, 1])")
    if a.crop_m != 0 and fixed >= 0:
        raise EcvlError(
            f"aug.crop_m={a.crop_m} moves each crop by the sample's M, and stage2.randaug_m={fixed} gives every "
            f"sample the same M: set stage2.randaug_m = -1 (M from the memory)"
        )
    if a.crop_m_shuffle and a.crop_m == 0:
        raise EcvlError("aug.crop_m_shuffle = true deals out the memory-driven crop's scales: set aug.crop_m too")
    if s.views == 1 and (s.dcvl_weight > 0 or (reads_memory(cfg) and a.m_source == "dcvl")):
        raise EcvlError(
            "stage2.views = 1: L_DCVL (eq. 11) compares two views of each image; set stage2.views = 2, "
            'or stage2.dcvl_weight = 0 with an aug.m_source other than "dcvl"'
        )
    return cfg


def reads_memory(cfg: Config) -> bool:
    """Stage 2 reads M: the memory-driven RandAugment (eq. 10) or the memory-driven crop."""
    return cfg.stage2.randaug or cfg.aug.crop_m != 0


def trained_scale(cfg: Config, stage: int) -> float | None:
    """The logit scale a checkpoint of `stage` was trained at with the class text features as its
    classifier: prompt CE's ce_scale, or None for CLIP's own logit scale (the CLIP loss, zero-shot).
    Evaluation uses it too, so that a post-hoc tau (and predict's probabilities) mean what they
    meant in training, whatever the loaded model's logit_scale is. A cosine head brings its own."""
    if stage == 2:
        return cfg.stage2.ce_scale
    return cfg.stage1.ce_scale if stage == 1 and cfg.stage1.loss == "prompt-ce" else None


def stage2_from_pretrained(cfg: Config) -> bool:
    """Stage 2 starts from model.pretrained, not a stage-1 checkpoint: stage2.init = "none", or no
    stage 1 at all (stage1.epochs = 0, LIFT's single-stage form)."""
    return cfg.stage2.init == "none" or (cfg.stage2.init == "" and cfg.stage1.epochs == 0)


# A quick trial (Lightning's fast_dev_run, limit_train_batches): every stage, epoch end, checkpoint
# and report of the command, at a few steps per epoch and a small evaluation, in its own folder.
TRIAL = {"limit_steps": 3, "epochs": 2, "limit_eval": 64}


def trial(cfg: Config) -> Config:
    """`cfg` as a quick trial: at most TRIAL's steps per epoch, epochs per stage and images per
    evaluated split, in <run.out>-trial (a real run's folder is never touched)."""
    r = dataclasses.replace(
        cfg.run,
        out=f"{cfg.run.out.rstrip('/')}-trial",
        limit_steps=TRIAL["limit_steps"],
        limit_eval=TRIAL["limit_eval"],
    )
    s1 = dataclasses.replace(cfg.stage1, epochs=min(cfg.stage1.epochs, TRIAL["epochs"]))
    s2 = dataclasses.replace(cfg.stage2, epochs=min(cfg.stage2.epochs, TRIAL["epochs"]))
    return dataclasses.replace(cfg, run=r, stage1=s1, stage2=s2)


def load_config(path: Path | None = None, overrides: list = (), origins: dict | None = None) -> Config:
    """Defaults, then the TOML file (its `recipe` and `dataset` first: recipes.py), then each
    override: "section.key=value", or (flag, that) for a short flag (`--epochs`), which its error
    then names. `origins`, when given, gets where each setting that is not a default came from."""
    cfg, origins = Config(), {} if origins is None else origins
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise EcvlError(f"{path}: no such config file")
        try:
            own = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise EcvlError(f"{path}: invalid TOML ({e})") from None
        cfg = _layered(own, str(path), origins)
    for item in overrides:
        flag, item = item if isinstance(item, tuple) else (None, item)  # (a short flag, what it stands for)
        name, sep, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise EcvlError(f"--set {item!r}: expected section.key=value")
        cfg = _merge(cfg, section, key, value.strip(), flag or f"--set {name.strip()}")
        origins[section, key] = flag or "--set"
    return check_together(cfg)


def _layered(own: dict, where: str, origins: dict) -> Config:
    """A TOML file's settings over its recipe's and its dataset's (recipes.py)."""
    from ecvl_fast import recipes

    recipe, dataset = own.pop("recipe", None), own.pop("dataset", None)
    for name, value in (("recipe", recipe), ("dataset", dataset)):
        if value is not None and not isinstance(value, str):
            raise EcvlError(f"{where}: {name} must be a name in quotes, not {value!r}")
    below = recipes.layers(recipe, dataset, where)  # unknown names refused first
    recipes.check_own(recipe, own, where)
    cfg = Config()
    for origin, settings in below + [(where, own)]:
        cfg = from_dict(settings, where if origin == where else f"{where} ({origin})", base=cfg, complete=False)
        origins.update({(section, key): origin for section, values in settings.items() for key in values})
    return cfg


def annotated_toml(cfg: Config, origins: dict) -> str:
    """The config as TOML with where each value came from (default, recipe, dataset, the file, a
    flag or --set) as a comment on its line: what --dry-run prints."""
    lines, section = [], None
    for line in config_toml(cfg).splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line and section:
            line += f"  # {origins.get((section, line.split(' = ')[0]), 'default')}"
        lines.append(line)
    return "\n".join(lines)


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config as TOML, loadable again with --config."""
    Path(path).write_text(config_toml(cfg))


def config_toml(cfg: Config) -> str:
    """The config as TOML, written by a TOML writer: any string a `--set` gave (quotes, newlines)
    reads back as it was, and cannot add or change a key."""
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())
