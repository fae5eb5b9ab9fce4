"""LIFT's ingredients (issue 24): the light modules, the cosine head, test-time ensembling,
post-hoc tau chosen on val, the rows in `ablate` (two-stage and single-stage), and export/predict
carrying all of it."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ecvl_fast import EcvlError
from ecvl_fast.cli import main
from ecvl_fast.config import ModelCfg, load_config, trained_scale
from ecvl_fast.method import peft
from ecvl_fast.method import stage2 as two
from ecvl_fast.method.model import (
    ClipNet,
    CosineHead,
    Scorer,
    adapted_features,
    build_clip,
    tte_views,
    zero_shot_logits,
)

from conftest import TINY


def tower(name: str):
    torch.manual_seed(0)
    clip, _ = build_clip(ModelCfg(name=name))
    return clip.eval()


@pytest.mark.parametrize(
    "name, module",
    [
        ("ecvl-tiny-vit", "adaptformer"),
        ("ecvl-tiny-vit", "lora"),
        ("ecvl-tiny-vit", "bitfit"),
        ("ecvl-small-rn", "bitfit"),
    ],
)
def test_light_module_starts_as_the_frozen_tower_and_trains_only_itself(name, module):
    clip = tower(name)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    frozen = clip.encode_image(x).detach()
    tuned = copy.deepcopy(clip)
    assert peft.apply(tuned.visual, module, num_classes=100) == module
    torch.testing.assert_close(tuned.encode_image(x), frozen, atol=1e-5, rtol=1e-5)  # zero-initialised: the same
    trainable = {k for k, p in tuned.visual.named_parameters() if p.requires_grad}
    assert trainable  # the module has parameters to train
    if module == "bitfit":
        assert all(k.endswith("bias") for k in trainable)
    else:  # only the added parameters: none of the tower's own
        assert trainable.isdisjoint(k for k, _ in clip.visual.named_parameters())
    before = {k: v.clone() for k, v in tuned.visual.state_dict().items()}
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.5)
    tuned.train()
    F.cross_entropy(tuned.encode_image(x)[:, :4] * 10, torch.arange(4)).backward()
    opt.step()
    changed = {k for k, v in tuned.visual.state_dict().items() if not torch.equal(v, before[k])}
    param_names = {k for k, _ in tuned.visual.named_parameters()}
    assert changed & trainable and (changed & param_names) <= trainable, changed - trainable
    assert not any(p.grad is not None for p in clip.parameters())  # the original was never touched


def test_light_module_that_does_not_apply_is_one_line():
    for module in ("adaptformer", "lora"):
        with pytest.raises(EcvlError, match="ViT's attention blocks.*ModifiedResNet.*bitfit"):
            peft.apply(tower("ecvl-small-rn").visual, module, 10, tower="ecvl-small-rn")
    assert (
        peft.bottleneck(1000, 12) == 32 and peft.bottleneck(10, 2) == 2 and peft.bottleneck(3, 12) == 1
    )  # LIFT's rule
    assert peft.bottleneck(1000, 12, "lora") == 16 and peft.bottleneck(100, 12, "lora") == 2  # K / (4 L)
    saved = tower("ecvl-tiny-vit")
    peft.apply(saved.visual, "lora", 10, 4)
    assert peft.saved_width(saved.visual.state_dict()) == 4  # a LoRA saved at another rank loads at its own
    assert peft.saved_width(tower("ecvl-tiny-vit").visual.state_dict()) == 0


def test_cosine_head_starts_from_the_text_features_logits():
    gen = torch.Generator().manual_seed(2)
    text = F.normalize(torch.randn(7, 16, generator=gen), dim=-1)
    f = F.normalize(torch.randn(5, 16, generator=gen), dim=-1)
    head = CosineHead(text, 25.0)
    torch.testing.assert_close(zero_shot_logits(f, head.weights(), head.scale), 25.0 * f @ text.T)
    assert head.weight.requires_grad and head.weight.data_ptr() != text.data_ptr()


def test_test_time_ensembling_with_one_view_is_plain_evaluation():
    clip = tower("ecvl-tiny-vit")
    net = ClipNet(clip).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    text = F.normalize(torch.randn(6, 64, generator=torch.Generator().manual_seed(4)), dim=-1)
    with torch.no_grad():
        plain = zero_shot_logits(net(x)[0], text, net.logit_scale)
        torch.testing.assert_close(Scorer(net, text, views=1)(x), plain, rtol=0, atol=0)
        views = tte_views(x, 10)
        assert len(views) == 10 and all(v.shape == x.shape for v in views)
        torch.testing.assert_close(views[1], x.flip(-1))  # the mirror, then the shifted crops
        assert not torch.equal(views[2], x) and torch.equal(views[6], views[2].flip(-1))
        two_views = Scorer(net, text, views=2)(x)
        torch.testing.assert_close(two_views, (plain + zero_shot_logits(net(x.flip(-1))[0], text, net.logit_scale)) / 2)


def test_tau_chosen_on_val_undoes_a_prior_bias():
    from ecvl_fast.experiments.evaluate import adjusted, choose_tau

    counts = np.array([400, 40, 4])
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 50)
    clean = np.eye(3)[labels] * 1.0 + rng.normal(0, 0.3, (150, 3))
    biased = clean + np.log(counts / counts.sum())  # what a model trained on the long tail adds
    tau, scores = choose_tau(biased.astype(np.float32), labels, counts)
    assert tau == 1.0 and scores[1.0] > scores[0.0] + 0.2
    np.testing.assert_array_equal(adjusted(biased, counts, 0.0), biased)  # tau 0: the identity


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny open_clip weights file, for the single-stage form (stage2 from model.pretrained)."""
    path = tmp_path_factory.mktemp("w") / "tiny-vit.pt"
    torch.save(tower("ecvl-tiny-vit").state_dict(), path)
    return path


def test_lift_rows_single_stage_from_pretrained_weights(tmp_path, mnist, pretrained, capsys):
    """`ablate` with stage1.epochs = 0: no stage 1; the LIFT rows start from model.pretrained,
    train their light module and cosine head, and `lift+ra` is set against `lift+freq`."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY.format(epochs=0, loss="prompt-ce") + "[stage2]\nepochs = 1\nlr = 1e-2\n")
    out = tmp_path / "abl"
    assert (
        main(
            [
                "ablate",
                "--config",
                str(cfg),
                "--seeds",
                "0",
                "--rows",
                "lift,lift+ra,lift+freq",
                "--pretrained",
                str(pretrained),
                "--set",
                f"data.path={mnist}",
                "--set",
                f"run.out={out}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "lift = LIFT (light module, cosine head, LA loss)" in printed  # the row described once
    assert "(adaptformer in the image tower, cosine head)" in printed  # "auto", resolved
    result = json.loads((out / "ablation.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["zero-shot", "lift", "lift+ra", "lift+freq"]
    assert not (out / "seed0" / "last.pt").exists()  # no stage 1
    assert {(e["row"], e["against"]) for e in result["paired"]} == {("lift+ra", "lift+freq")}
    weights = torch.load(pretrained, weights_only=True)
    for row in ("lift", "lift+ra", "lift+freq"):
        c = load_config(out / "seed0" / row / "config.toml")
        s = c.stage2
        assert (s.adapter, s.peft, s.head, s.logit_adjust, s.sampling) == (False, "auto", "cosine", 1.0, "instance")
        state = torch.load(out / "seed0" / row / "last.pt", weights_only=True)
        assert state["adapter"] is None and state["head"]["weight"].shape == (10, 64)
        branch = [k for k in state["model"] if ".branch." in k]  # AdaptFormer, LIFT's default on a ViT
        assert branch and any(state["model"][k].abs().sum() > 0 for k in branch if k.endswith("up.weight"))
        for k, v in weights.items():  # the frozen tower is model.pretrained's, unchanged
            if k.startswith("visual.") and "resblocks" not in k:
                torch.testing.assert_close(state["model"]["clip." + k], v)
    assert load_config(out / "seed0" / "lift+ra" / "config.toml").aug.m_source == "lol"
    assert load_config(out / "seed0" / "lift+freq" / "config.toml").aug.m_source == "frequency"


@pytest.fixture(scope="module")
def lift_run(tmp_path_factory, mnist, pretrained):
    """One LoRA + cosine head + LA stage-2 run with 3 test-time views, single-stage."""
    tmp = tmp_path_factory.mktemp("lift")
    cfg = tmp / "tiny.toml"
    cfg.write_text(TINY.format(epochs=0, loss="prompt-ce") + "[stage2]\nepochs = 1\nlr = 1e-2\n")
    sets = [
        f"data.path={mnist}",
        f"run.out={tmp / 'run'}",
        f"model.pretrained={pretrained}",
        "stage2.adapter=false",
        "stage2.peft=lora",
        "stage2.head=cosine",
        "stage2.logit_adjust=1",
        "stage2.optimizer=sgd",
        "data.tte_views=3",
        "stage2.randaug=false",
        "stage2.dcvl_weight=0",
        "stage2.views=1",
    ]
    assert main(["train", "--config", str(cfg), *[a for s in sets for a in ("--set", s)]]) == 0
    return tmp, tmp / "run" / "stage2" / "last.pt"


def test_export_and_predict_carry_the_head_module_and_ensembling(lift_run, mnist, capsys):
    from ecvl_fast.loaders.ffcv_loader import make_loader
    from ecvl_fast.serving.predict import run_predict

    tmp, ckpt = lift_run
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["data"]["tte_views"] == 3 and state["head"] is not None
    folder = tmp / "digits"
    folder.mkdir(exist_ok=True)
    images, _, _ = next(iter(make_loader(mnist / "test.beton", "sequential", 24, 32)))
    for i, im in enumerate(images.numpy()):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    for fmt in ("pt", "onnx"):
        assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp / f"model.{fmt}"), "--format", fmt]) == 0
    exported = torch.load(tmp / "model.pt", weights_only=True)
    assert (exported["peft"], exported["tte_views"], exported["logit_scale"]) == ("lora", 3, 25.0)
    torch.testing.assert_close(exported["class_weights"], F.normalize(state["head"]["weight"], dim=-1))
    preds = {
        n: run_predict(ckpt if n == "ckpt" else tmp / n, [], folder, top_k=10, device="cpu")
        for n in ("ckpt", "model.pt", "model.onnx")
    }
    one_view = run_predict(ckpt, [], folder, top_k=10, device="cpu", views=1)
    classes = state["classes"]

    def probs(ps):
        return np.array([[dict(zip(p.classes, p.probs))[c] for c in classes] for p in ps])

    ref = probs(preds["ckpt"])
    for name, tol in (("model.pt", 1e-4), ("model.onnx", 1e-3)):
        np.testing.assert_allclose(probs(preds[name]), ref, atol=tol, err_msg=name)
    assert np.abs(probs(one_view) - ref).max() > 1e-4  # the three views are in the files, not one
    with pytest.raises(EcvlError, match="fixed at export"):
        run_predict(tmp / "model.onnx", [], folder, device="cpu", views=1)


def test_eval_tte_and_tau_auto_on_a_val_split(lift_run, mnist, tmp_path, capsys):
    tmp, ckpt = lift_run
    data = tmp_path / "mnist-val"  # the test split again as a val split: enough to choose on
    shutil.copytree(mnist, data)
    shutil.copy(mnist / "test.beton", data / "val.beton")
    meta = json.loads((data / "meta.json").read_text())
    meta["images"]["val"] = meta["images"]["test"]
    meta["sha256"]["val.beton"] = meta["sha256"]["test.beton"]  # the same file
    (data / "meta.json").write_text(json.dumps(meta))
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(data), "--tau", "auto", "--out", str(tmp_path / "a")]) == 0
    assert "best mean per-class accuracy on the val split" in capsys.readouterr().out
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    scores = m["tau_val_scores"]
    assert m["posthoc_tau"] == max(map(float, scores), key=lambda t: (scores[f"{t:g}"], -t)) and m["tte_views"] == 3
    assert main(["eval", "--ckpt", str(ckpt), "--tte", "1", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["tte_views"] == 1
    assert main(["eval", "--ckpt", str(ckpt), "--tau", "auto", "--out", str(tmp_path / "c")]) == 2
    assert "has none (convert with --val-per-class N)" in capsys.readouterr().err
    for bad in (["--tte", "11"], ["--tau", "-1"], ["--tau", "often"]):
        assert main(["eval", "--ckpt", str(ckpt), *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_lift_settings_are_checked(tmp_path):
    with pytest.raises(EcvlError, match="stage 2 would train nothing"):
        load_config(None, ["stage2.adapter=false"])
    with pytest.raises(EcvlError, match="stage2.peft must be one of"):
        load_config(None, ["stage2.peft=vpt"])
    with pytest.raises(EcvlError, match="at most 10"):
        load_config(None, ["data.tte_views=11"])
    with pytest.raises(EcvlError, match="L_DCVL .* compares two views"):  # the paper's loss needs both
        load_config(None, ["stage2.views=1"])
    assert load_config(None, ["stage2.views=1", "stage2.dcvl_weight=0", "aug.m_source=frequency"]).stage2.views == 1
    with pytest.raises(EcvlError, match="no stage 1 to train"):
        from ecvl_fast.training import loop

        loop.main(load_config(None, ["stage1.epochs=0", f"run.out={tmp_path}"]), stage=1)


def test_evaluation_uses_the_scale_training_used():
    """A post-hoc tau is in units of the trained logits: a prompt-CE model is scored at its
    ce_scale, whatever the loaded model's logit_scale (1/0.07 for random or stand-in weights)."""
    cfg = load_config(None, ["stage2.ce_scale=50", "stage1.loss=prompt-ce", "stage1.ce_scale=80"])
    assert (trained_scale(cfg, 1), trained_scale(cfg, 2)) == (80, 50)
    assert trained_scale(load_config(None, ["stage1.loss=clip"]), 1) is None  # CLIP's loss trains at its own
    net = ClipNet(tower("ecvl-tiny-vit")).eval()
    text = F.normalize(torch.randn(10, 64), dim=-1)
    st = two.modules(cfg, net, text)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = 50 * adapted_features(net(x)[0], st.adapter) @ text.T
        torch.testing.assert_close(two.scorer(cfg, st)(x), expected)


def test_stage2_modules_load_back_and_refuse_a_mismatch():
    clip = tower("ecvl-tiny-vit")
    cfg = load_config(None, ["model.name=ecvl-tiny-vit", "stage2.head=cosine", "stage2.peft=adaptformer"])
    net = ClipNet(clip)
    two.add_light_module(cfg, net, 10)
    text = F.normalize(torch.randn(10, 64), dim=-1)
    st = two.modules(cfg, net, text)
    with torch.no_grad():
        st.head.weight.add_(1.0)
    saved = two.state(st)
    fresh = two.modules(cfg, net, text)
    two.load(fresh, saved)
    torch.testing.assert_close(fresh.head.weight, st.head.weight)
    with pytest.raises(EcvlError, match="has no stage-2 head"):
        two.load(fresh, {**saved, "head": None})
