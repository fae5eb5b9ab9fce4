"""Recipes and datasets, each declared once; presets and `ablate` rows are built from them.

A recipe is what defines a method's stage 2, as settings over the defaults (`row`: the [stage2],
[aug] and evaluation [data] keys `ablate --rows NAME` applies on shared stage-1 encoders), plus
the budget its authors published (`schedule`: model, resolution, batch, epochs, stage 1), which a
preset adds. A dataset is where `convert` writes it. A preset names one of each and adds its own
few settings (`recipe = "lift"`, `dataset = "cifar100-lt"`); `config.load_config` composes them,
in this order, later ones winning: defaults, the recipe's schedule, its row, the dataset, the
preset's own settings, the command line. A preset may not set a key of its recipe's row, so a
row and a preset of the same name cannot differ. A saved run's config.toml stays the full, flat,
resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ecvl_fast import EcvlError

# The paper's memory (eqs. 8-10): the per-sample L_DCVL, its rank within the whole train set, high M
# for poorly learned samples. Rows that change where M comes from start here (method/rows.py).
PAPER_MEMORY = {"m_source": "dcvl", "m_scope": "sample", "m_direction": "hard"}


@dataclass(frozen=True)
class Recipe:
    row: dict[str, dict]  # section -> settings: the method's stage 2 (what `ablate --rows NAME` applies)
    schedule: dict[str, dict] = field(default_factory=dict)  # the published budget a preset adds


RECIPES = {
    # BALLAD phase B (Ma et al. 2021, github.com/gaopengcuhk/BALLAD): the adapter on class-balanced
    # batches, prompt CE only
    "ballad": Recipe({"stage2": {"dcvl_weight": 0.0, "randaug": False}, "aug": PAPER_MEMORY}),
    # + momentum: L_DCVL (eq. 11) added and the bank updated (eqs. 8-9), M unused
    "momentum": Recipe({"stage2": {"randaug": False}, "aug": PAPER_MEMORY}),
    # ECVL: + the memory-driven RandAugment (eq. 10). Its schedule: the paper's optimiser and epochs
    # where it gives them, BALLAD's official settings otherwise (its phase A and B scripts), BCL's
    # for the momentum (Zhu et al. 2022)
    "ecvl": Recipe(
        {"stage2": {"randaug": True}, "aug": PAPER_MEMORY},
        {
            "data": {
                "res": 224,  # CLIP RN50's input size; BALLAD: RandomResizedCrop(224, scale 0.5-1) + flip
                "batch_size": 512,  # BALLAD phase A batch (global, split over GPUs)
                "workers": 8,
            },
            "model": {
                "name": "RN50-quickgelu",  # OpenAI trained CLIP with QuickGELU; open_clip's "RN50" has GELU
                "pretrained": "openai",  # open_clip tag; a local file where there is no network
                "templates": "openai",  # evaluation prompts: open_clip's 80 ImageNet templates, averaged
            },
            "aug": {
                "k": 2,  # RandAugment ops per sample (eq. 10)
                "beta": 0.97,  # EMA momentum of the per-sample loss (eq. 8; BCL's official value)
                "crop_min_scale": 0.5,  # BALLAD's RandomResizedCrop scale
            },
            "stage1": {
                "epochs": 50,  # BALLAD phase A
                "loss": "prompt-ce",  # BALLAD phase A: CE of image features against all class prompts, scale 100
                "lr": 1e-5,  # BALLAD phase A learning rate, here with AdamW (the paper's optimiser)
                "weight_decay": 0.1,
                "warmup_epochs": 1.0,
            },
            "stage2": {
                "epochs": 300,  # the paper's; with beta 0.97 the first epoch's loss weighs 0.97^299 ~ 1e-4 in M
                "lr": 1e-3,  # AdamW (the paper); BALLAD's SGD uses 0.2
                "ratio": 0.2,  # eq. 7's lambda, BALLAD's adapter ratio
                "temperature": 0.2,  # L_DCVL's NT-Xent temperature (BCL)
                "dcvl_weight": 1.0,  # eq. 11's weight (the default)
            },
            "run": {"log_every": 50},
        },
    ),
    # LIFT (Shi et al., "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts", ICML 2024,
    # arXiv 2309.10019; code shijxcs/LIFT, configs/model/clip_vit_b16_peft.yaml): a light module in the
    # frozen image tower instead of the adapter ("auto": AdaptFormer on a ViT, BitFit on a ResNet; a
    # config that names one keeps it), a cosine head from the text features at scale 25, the
    # logit-adjusted loss (tau 1), instance sampling, SGD (lr 0.01, momentum 0.9, weight decay 5e-4),
    # one view per image; RandomResizedCrop at torchvision's default scale (0.08, 1) + flip from the whole
    # image; tested on Resize(res + 24/224 res) then FiveCrop(res), averaged. Where it differs from LIFT's
    # code: the cosine head scores the joint (projected) image features, where LIFT's scores the 768-d
    # ones before the projection; LIFT steps its cosine schedule per epoch, this trainer per step
    "lift": Recipe(
        {
            "stage2": {
                "adapter": False,
                "peft": "auto",
                "head": "cosine",
                "logit_adjust": 1.0,
                "sampling": "instance",
                "dcvl_weight": 0.0,
                "randaug": False,
                "optimizer": "sgd",
                "lr": 0.01,
                "weight_decay": 5e-4,
                "views": 1,
            },
            "aug": {**PAPER_MEMORY, "crop_min_scale": 0.08},
            "data": {"tte_views": 5, "tte_crops": "five"},
        },
        {
            "data": {"res": 224, "batch_size": 128, "workers": 8},  # LIFT's batch
            "model": {
                "name": "ViT-B-16-quickgelu",  # OpenAI trained CLIP with QuickGELU
                "pretrained": "openai",
                "templates": "single",  # "a photo of a {}.": LIFT's head initialisation prompt
            },
            "stage1": {"epochs": 0},  # one stage: stage 2 starts from model.pretrained
            "stage2": {"epochs": 10, "warmup_epochs": 0.0, "head_scale": 25.0},  # LIFT's (no warm-up)
            "run": {"log_every": 50},
        },
    ),
}
# LIFT+ (Shi et al., "LIFT+: Lightweight Fine-Tuning for Long-Tail Learning", arXiv 2504.13282; code
# shijxcs/LIFT-plus, trainer.py and utils/transforms.py): LIFT with less augmentation. Its minimalist
# crop: square, no flip, bicubic, the minimum scale rising from 0.08 to 1 over training on the convex
# schedule 1 - sqrt(1 - t^2) (t = epoch / (epochs - 1)); 5 epochs at lr 0.02 (scripts/run_epochs.sh), half
# LIFT's cost; plain evaluation Resize(res + res // 7) then CenterCrop(res). Kept from LIFT: the light
# module, the cosine head at 25 from the text, the logit-adjusted loss, FiveCrop after Resize(res + 24).
# Its LoRA rank rule, K / (4 L), is the light module's own (method/peft.py, `bottleneck`).
RECIPES["lift+"] = Recipe(
    {
        "stage2": {**RECIPES["lift"].row["stage2"], "epochs": 5, "lr": 0.02},
        "aug": {
            **RECIPES["lift"].row["aug"],
            "crop_schedule": "lift+",
            "crop_square": True,
            "flip": False,
            "interp": "cubic",
        },
        "data": {**RECIPES["lift"].row["data"], "eval_resize": "lift+"},
    },
    {**RECIPES["lift"].schedule, "stage2": {"warmup_epochs": 0.0, "head_scale": 25.0}},  # epochs: the row's
)

# Where `convert` writes each dataset the presets name (README, "Reproducing the paper", for the sources)
DATASETS = {
    # `ecvl-fast convert cifar100-lt --source cifar-100-python --imbalance 100 --out data/cifar100-lt`: 100
    # classes, 32 px images (upsampled to the model's resolution); another imbalance factor: --out
    # data/cifar100-lt-50 and --set data.path=data/cifar100-lt-50
    "cifar100-lt": {"data": {"path": "data/cifar100-lt"}},
    # ImageNet-2012 images + OLTR's ImageNet_LT_{train,val,test}.txt: 1,000 classes, `--format jpg --max-res 256`
    "imagenet-lt": {"data": {"path": "data/imagenet-lt"}},
    # Places-365-Standard images + OLTR's Places_LT_{train,val,test}.txt: 365 classes, `--format jpg --max-res 256`
    "places-lt": {"data": {"path": "data/places-lt"}},
    # the embedded MNIST digits made long-tailed (`ecvl-fast convert mnist-lt`; `make demo` does it)
    "mnist-lt": {"data": {"path": "data/mnist-lt"}},
}


def layers(recipe: str | None, dataset: str | None, where: str) -> list[tuple[str, dict]]:
    """(origin, {section: settings}) for a preset's recipe and dataset, in the order they apply."""
    out = []
    if recipe is not None:
        if recipe not in RECIPES:
            raise EcvlError(f"{where}: recipe = {recipe!r} is not a recipe (known: {', '.join(RECIPES)})")
        out += [(f"recipe {recipe}", RECIPES[recipe].schedule), (f"recipe {recipe}", RECIPES[recipe].row)]
    if dataset is not None:
        if dataset not in DATASETS:
            raise EcvlError(f"{where}: dataset = {dataset!r} is not a dataset (known: {', '.join(DATASETS)})")
        out.append((f"dataset {dataset}", DATASETS[dataset]))
    return out


def check_own(recipe: str | None, own: dict, where: str) -> None:
    """A preset may not change its recipe's row: that is the recipe, and a row of the same name must
    be the same method. (The command line may: `--set` is the user's.)"""
    if recipe is None:
        return
    clash = [f"{s}.{k}" for s, keys in RECIPES[recipe].row.items() for k in keys if k in (own.get(s) or {})]
    if clash:
        raise EcvlError(
            f"{where}: sets {', '.join(clash)}, which recipe {recipe!r} declares (recipes.py); "
            f"a variant of the method is a new recipe, or a --set on the command line"
        )
