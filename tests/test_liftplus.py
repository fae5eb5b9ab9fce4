"""LIFT+'s minimalist augmentation and the memory-driven crop: the schedule, square crops, the
per-sample minimum scales and their shuffled control, through the draws and the DALI loader, and
the rows and settings that name them."""

import numpy as np
import pytest
import torch

from dali_helpers import images, run
from ecvl_fast import EcvlError
from ecvl_fast.config import Config, load_config
from ecvl_fast.loaders.dali_loader import AugmentedLoader
from ecvl_fast.loaders.draws import (
    CROP_STREAMS,
    MIN_AREA,
    AugSpec,
    batch_draws,
    min_scale,
    sample_min_scales,
    square_boxes,
    uniforms,
)
from ecvl_fast.loaders.held import HeldLoader
from ecvl_fast.loaders.torch_reference import reference_batch

LIFT_PLUS = AugSpec(res=32, randaug=False, square=True, flip=False, schedule="lift+", epochs=5, crop_scale=(0.08, 1))


def test_the_schedule_rises_from_the_minimum_to_whole_images():
    got = [min_scale(LIFT_PLUS, e) for e in range(5)]
    t = np.arange(5) / 4
    assert np.allclose(got, 0.08 + 0.92 * (1 - np.sqrt(1 - t**2)))  # LIFT+'s convex schedule
    assert got[0] == pytest.approx(0.08) and got[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(got, got[1:]))
    assert min_scale(AugSpec(crop_scale=(0.3, 1)), 7) == 0.3  # "constant"


def test_square_crops_are_square_in_pixels_and_inside_the_image():
    n = 4000
    r = uniforms(0, 0, np.arange(n), CROP_STREAMS)
    for aspect in (1.0, 4 / 3, 0.5):
        box = square_boxes(r, 0.2, 1.0, aspect=np.full(n, aspect))
        h, w = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
        assert np.allclose(w * aspect, h, rtol=1e-5)  # width in pixels = height in pixels
        assert (box >= 0).all() and (box <= 1 + 1e-6).all()
        area, cap = h * w, min(aspect, 1 / aspect)  # the largest square's share of the image
        assert area.min() >= 0.2 - 1e-6 and area.max() <= cap + 1e-6
        assert abs(area.mean() - (0.2 + cap) / 2) < 0.02  # area ~ U(lo, cap)


def test_per_sample_minimum_scales_follow_m_around_the_schedule():
    m = np.random.default_rng(0).random(2000)
    gentle = AugSpec(**{**LIFT_PLUS.__dict__, "crop_m": 0.5})
    s = sample_min_scales(gentle, 2, m, seed=1)
    assert abs(s.mean() - min_scale(gentle, 2)) < 0.01  # the schedule is the population's mean
    assert np.corrcoef(s, m)[0, 1] > 0.99 and s.min() >= MIN_AREA  # high M: a gentler crop
    harsh = sample_min_scales(AugSpec(**{**gentle.__dict__, "crop_m": -0.5}), 2, m, seed=1)
    assert np.corrcoef(harsh, m)[0, 1] < -0.99
    shuffled_spec = AugSpec(**{**gentle.__dict__, "crop_shuffle": True})
    shuffled = sample_min_scales(shuffled_spec, 2, m, seed=1)
    assert np.array_equal(np.sort(shuffled), np.sort(s))  # the same scales ...
    assert abs(np.corrcoef(shuffled, m)[0, 1]) < 0.1  # ... dealt out regardless of M
    assert np.array_equal(shuffled, sample_min_scales(shuffled_spec, 2, m, seed=1))  # reproducible
    assert not np.array_equal(shuffled, sample_min_scales(shuffled_spec, 3, m, seed=1))  # a new deal per epoch
    assert np.all(sample_min_scales(LIFT_PLUS, 2, m) == min_scale(LIFT_PLUS, 2))  # no crop_m: the schedule
    assert np.all(sample_min_scales(gentle, 2, np.full(9, 0.3)) == min_scale(gentle, 2))  # M all alike


def test_no_flip_and_the_cubic_filter_through_dali():
    imgs = images(16, 40)
    draws = batch_draws(LIFT_PLUS, np.arange(16), seed=4, epoch=1)
    assert not draws[0]["flip"].any()
    flipping = batch_draws(AugSpec(**{**LIFT_PLUS.__dict__, "flip": True}), np.arange(16), seed=4, epoch=1)
    assert flipping[0]["flip"].any()
    cubic = AugSpec(**{**LIFT_PLUS.__dict__, "interp": "cubic"})
    out, linear = run(cubic, imgs, np.zeros(16), draws)[0], run(LIFT_PLUS, imgs, np.zeros(16), draws)[0]
    ref = reference_batch(imgs, np.zeros(16), draws, cubic)[0].permute(0, 2, 3, 1).numpy()  # PIL's bicubic
    assert not np.array_equal(out, linear)
    # DALI's and PIL's cubic kernels differ slightly: the cubic output is closer to PIL's bicubic
    assert np.abs(out - ref).mean() < np.abs(linear - ref).mean() and np.abs(out - ref).mean() < 0.05


class Fixed:
    def __init__(self, m):
        self.m = np.asarray(m, np.float32)

    def magnitudes(self):
        return self.m


def test_the_loader_crops_high_m_samples_more_gently():
    """Images whose value is their column: a view's spread of values is the width of its crop. With
    crop_m = 1, samples at M = 1 get a minimum scale ~1 above those at M = 0; the shuffled control
    gives both halves the same crops on average."""
    n, side = 256, 48
    ramp = np.linspace(0, 255, side).astype(np.uint8)
    imgs = np.broadcast_to(ramp[None, None, :, None], (n, side, side, 3)).copy()
    m = np.tile([0.0, 1.0], n // 2)
    spans = {}
    for shuffle in (False, True):
        spec = AugSpec(**{**LIFT_PLUS.__dict__, "crop_m": 1.0, "crop_shuffle": shuffle})
        held = HeldLoader(imgs, np.zeros(n), "random", 64, seed=5, rank=1, world=2)  # positions are not indices
        loader = AugmentedLoader(held, spec, Fixed(m), prefetch=0, rank=1, world=2)
        loader.epoch = 2  # the schedule's middle: 0.2
        width, high = [], []
        for views, _, idx in loader:
            x = views[0][:, 0]
            width.append((x.amax((1, 2)) - x.amin((1, 2))).numpy())
            high.append(m[idx.numpy()] == 1)
        width, high = np.concatenate(width), np.concatenate(high)
        spans[shuffle] = width[high].mean() - width[~high].mean()
    assert spans[False] > 0.5  # in normalised units: the M = 1 half sees far wider crops
    assert abs(spans[True]) < 0.25 * spans[False]


def test_settings_are_checked_together():
    with pytest.raises(EcvlError, match=r"aug.crop_m=1.5.*\[-1, 1\]"):
        load_config(None, ["aug.crop_m=1.5"])
    with pytest.raises(EcvlError, match="crop_m_shuffle.*set aug.crop_m"):
        load_config(None, ["aug.crop_m_shuffle=true"])
    with pytest.raises(EcvlError, match="views = 1"):
        load_config(None, ["stage2.views=1", "stage2.dcvl_weight=0", "stage2.randaug=false", "aug.crop_m=0.5"])
    with pytest.raises(EcvlError, match="randaug_m=0.5 gives every sample the same M"):
        load_config(None, ["aug.crop_m=0.5", "stage2.randaug_m=0.5"])
    with pytest.raises(EcvlError, match="aug.interp"):
        load_config(None, ["aug.interp=bicubic"])


def test_evaluation_resize_rule():
    from ecvl_fast.training.data import load_res

    rule = lambda res, how: load_res(load_config(None, [f"data.res={res}", f"data.eval_resize={how}"]))  # noqa: E731
    assert (rule(32, "auto"), rule(224, "auto")) == (32, 256)
    assert (rule(32, "lift+"), rule(224, "lift+"), rule(336, "lift+")) == (36, 256, 384)  # res + res // 7
    assert load_res(load_config(None, ["data.eval_resize=lift+", "data.load_res=300"])) == 300  # load_res wins


def test_lift_plus_rows_and_the_command_line_over_a_row():
    """The rows apply their recipe's settings (and their own budget); what the command line pins
    keeps its value over any row, and a trial's epochs hold over a row's."""
    from ecvl_fast.experiments.ablate import _stage2_cfg

    base = Config()
    row = _stage2_cfg(base, "lift+")
    assert (row.stage2.epochs, row.stage2.lr, row.aug.crop_schedule, row.aug.flip) == (5, 0.02, "lift+", False)
    assert (row.aug.crop_square, row.aug.interp, row.aug.crop_min_scale, row.data.eval_resize) == (
        True,
        "cubic",
        0.08,
        "lift+",
    )
    assert (_stage2_cfg(base, "lift+10ep").stage2.epochs, _stage2_cfg(base, "lift+10ep").stage2.lr) == (10, 0.01)
    mcrop, control = _stage2_cfg(base, "lift+mcrop"), _stage2_cfg(base, "lift+mcrop-shuffled")
    assert mcrop.aug.crop_m != 0 and not mcrop.aug.crop_m_shuffle and control.aug.crop_m_shuffle
    assert {**control.aug.__dict__, "crop_m_shuffle": False} == mcrop.aug.__dict__  # only the deal differs
    pinned = _stage2_cfg(
        load_config(None, ["aug.crop_m=-0.25", "stage2.epochs=3"]),
        "lift+mcrop",
        {("aug", "crop_m"), ("stage2", "epochs")},
    )
    assert (pinned.aug.crop_m, pinned.stage2.epochs, pinned.stage2.lr) == (-0.25, 3, 0.02)


def test_ablate_trial_keeps_its_epochs_over_a_rows(tmp_path, capsys, mnist):
    from ecvl_fast.cli import main

    args = ["ablate", "--config", "mnist-demo", "--rows", "lift+", "--trial", "--dry-run", "--seeds", "0"]
    assert main([*args, "--set", f"data.path={mnist}", "--out", str(tmp_path / "r")]) == 0
    assert "seed 0 lift+: stage 2, 2 epochs" in capsys.readouterr().out  # the row's own is 5


def test_memory_driven_crop_trains_and_records_m(tmp_path, mnist):
    """The row end to end on CPU: stage 2 from random encoders, 2 short epochs; the bank records each
    trained sample's CE, and M (its rank) spreads over [0, 1]."""
    from ecvl_fast.experiments.ablate import _stage2_cfg
    from ecvl_fast.training import loop as training

    settings = ["data.res=32", "data.batch_size=64", "model.name=ecvl-small-rn", "stage1.epochs=0"]
    settings += ["stage2.epochs=2", "run.limit_steps=3", "run.limit_eval=64", f"run.out={tmp_path / 'run'}"]
    cfg = _stage2_cfg(load_config(None, [f"data.path={mnist}", *settings]), "lift+mcrop", {("stage2", "epochs")})
    assert cfg.aug.crop_m != 0 and cfg.aug.m_source == "ce"
    training.main(cfg, stage=2)
    bank = torch.load(tmp_path / "run" / "stage2" / "last.pt", weights_only=True)["momentum"]
    seen = bank["seen"].bool()
    assert seen.sum() >= 3 * 64 // 2  # the samples of 2 x 3 steps, some drawn twice
    assert bank["m"][seen].max() > 0.9 and bank["m"][seen].min() < 0.1  # ranks
