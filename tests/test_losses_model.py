"""Losses against naive references (forward and gradient); zero-shot against open_clip's classifier."""

import math

import pytest
import torch
import torch.nn.functional as F

from ecvl_fast.method import losses
from ecvl_fast.config import ModelCfg
from ecvl_fast.method.model import ClipNet, build_clip, class_text_features, prompt_tokens, zero_shot_logits


def naive_clip_loss(img, txt, labels, scale):
    """Row by row: -sum_j q_ij log softmax_j, q uniform over same-class pairs; both directions."""
    b = len(labels)

    def direction(a, c):
        total = 0.0
        for i in range(b):
            logits = torch.stack([scale * (a[i] * c[j]).sum() for j in range(b)])
            logp = logits - torch.logsumexp(logits, 0)
            pos = [j for j in range(b) if labels[j] == labels[i]]
            total = total - sum(logp[j] for j in pos) / len(pos)
        return total / b

    return (direction(img, txt) + direction(txt, img)) / 2


def naive_prompt_ce(img, txt, labels, scale):
    total = 0.0
    for i in range(len(labels)):
        logits = torch.stack([scale * (img[i] * txt[c]).sum() for c in range(len(txt))])
        total = total - (logits[labels[i]] - torch.logsumexp(logits, 0))
    return total / len(labels)


def feats(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
def test_clip_loss_matches_naive(labels):
    labels = torch.tensor(labels)
    img, txt = feats(6, 8, seed=0), feats(6, 8, seed=1)
    ours = losses.clip_loss(img, txt, labels, 14.3)["loss"]
    ref = naive_clip_loss(img, txt, labels, 14.3)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours, (img, txt))
    g_ref = torch.autograd.grad(ref, (img, txt))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_clip_loss_rows_sum_to_the_global_mean():
    labels = torch.tensor([0, 1, 1, 2, 0, 3])
    img, txt = feats(6, 8, seed=2), feats(6, 8, seed=3)
    full = losses.clip_loss(img, txt, labels, 10.0)["loss"]
    halves = [losses.clip_loss(img, txt, labels, 10.0, rows=slice(r * 3, r * 3 + 3))["loss"] for r in range(2)]
    torch.testing.assert_close(sum(halves) / 2, full)


def test_prompt_ce_matches_naive():
    labels = torch.tensor([0, 2, 1, 2, 4])
    img, txt = feats(5, 8, seed=4), feats(5, 8, seed=5)
    ours = losses.prompt_ce_loss(img, txt, labels, 100.0)["loss"]
    ref = naive_prompt_ce(img, txt, labels, 100.0)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (img, txt)), torch.autograd.grad(ref, (img, txt))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["single", "openai"])
def test_zero_shot_equals_open_clip_classifier(kind):
    import open_clip

    torch.manual_seed(0)
    clip, tok = build_clip(ModelCfg(name="ecvl-tiny-vit"))
    clip.eval()
    net = ClipNet(clip)
    classes = ["zero", "one", "two", "three"]
    ours = class_text_features(net, prompt_tokens(tok, classes, kind))
    from ecvl_fast.method.model import templates

    theirs = open_clip.build_zero_shot_classifier(clip, tok, classes, list(templates(kind)), device="cpu")
    torch.testing.assert_close(ours, theirs.T, rtol=1e-5, atol=1e-5)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        img = F.normalize(clip.encode_image(images), dim=-1)
        logits = zero_shot_logits(net(images)[0], ours, net.logit_scale)
    torch.testing.assert_close(logits, clip.logit_scale.exp() * img @ theirs, rtol=1e-5, atol=1e-4)
    assert math.isclose(logits.softmax(1).sum(1).mean().item(), 1.0, rel_tol=1e-6)


def naive_dcvl(z1, z2, tau):
    """NT-Xent written per view: -log exp(s_pos/t) / sum_{k != self} exp(s_k/t), both directions."""
    z, b = torch.cat([z1, z2]), len(z1)
    per_view = []
    for i in range(2 * b):
        pos = (i + b) % (2 * b)
        denom = sum(torch.exp((z[i] * z[k]).sum() / tau) for k in range(2 * b) if k != i)
        per_view.append(-torch.log(torch.exp((z[i] * z[pos]).sum() / tau) / denom))
    per_view = torch.stack(per_view)
    return (per_view[:b] + per_view[b:]) / 2


def test_dcvl_matches_naive():
    z1, z2 = feats(5, 8, seed=6), feats(5, 8, seed=7)
    ours = losses.dcvl_loss(z1, z2, 0.2)
    ref = naive_dcvl(z1, z2, 0.2)
    torch.testing.assert_close(ours["per_sample"], ref)
    torch.testing.assert_close(ours["loss"], ref.mean())
    for a, b in zip(torch.autograd.grad(ours["loss"], (z1, z2)), torch.autograd.grad(ref.mean(), (z1, z2))):
        torch.testing.assert_close(a, b)


def test_adapter_is_eq7():
    from ecvl_fast.method.model import Adapter

    f = torch.randn(4, 8)
    a = Adapter(8, ratio=0.2)
    expect = 0.2 * torch.relu(f @ a.fc.weight.T + a.fc.bias) + 0.8 * f
    torch.testing.assert_close(a(f), expect)
    a.ratio = 0.0
    torch.testing.assert_close(a(f), f)


def test_losses_stay_fp32_under_bf16_autocast():
    """The step runs the losses inside bf16 autocast (CPU autocast here, CUDA in training). Their
    logit matmuls must still be fp32: at scale 100 bf16 would round logits to steps of 0.5."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(32, 64, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(10, 64, generator=g), dim=-1)
    z2 = F.normalize(torch.randn(32, 64, generator=g), dim=-1)
    labels = torch.arange(32) % 10
    calls = {
        "clip": lambda: losses.clip_loss(img, txt[labels], labels, 100.0)["loss"],
        "prompt_ce": lambda: losses.prompt_ce_loss(img, txt, labels, 100.0)["loss"],
        "dcvl": lambda: losses.dcvl_loss(img, z2, 0.2)["loss"],
    }
    for name, call in calls.items():
        plain = call()
        (grad_plain,) = torch.autograd.grad(plain, img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = call()
            bf16_logits = (100.0 * img @ txt.T).float()  # what autocast does to an unguarded matmul
        (grad_cast,) = torch.autograd.grad(cast, img)
        assert cast.dtype == torch.float32, name
        torch.testing.assert_close(cast, plain, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(grad_cast, grad_plain, rtol=1e-5, atol=1e-7, msg=name)
    assert (bf16_logits - 100.0 * img.detach() @ txt.T).abs().max() > 0.05  # the guard is needed


def test_confusion_and_macro_f1_match_scikit_learn():
    """Evaluation counts with numpy (the GPU check machine has no scikit-learn); parity with it,
    including classes that are never true, never predicted, or neither."""
    import numpy as np
    from sklearn.metrics import confusion_matrix, f1_score

    from ecvl_fast.evaluation.metrics import confusion, macro_f1

    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 6, 200), rng.integers(0, 5, 200)  # class 5 never predicted
    labels[labels == 4] = 3  # class 4 never true; 7 and 8 neither
    cm = confusion(labels, preds, 9)
    np.testing.assert_array_equal(cm, confusion_matrix(labels, preds, labels=np.arange(9)))
    assert macro_f1(cm) == pytest.approx(f1_score(labels, preds, labels=np.arange(9), average="macro", zero_division=0))


def test_logit_adjusted_loss_matches_a_hand_computation():
    """Menon et al.'s logit-adjusted CE: the loss of the logits plus tau * log(prior); the logits
    handed back stay unadjusted. tau = 0 is plain prompt CE."""
    counts = torch.tensor([500.0, 50.0, 5.0])
    labels = torch.tensor([0, 1, 2, 2])
    img, txt = feats(4, 8, seed=7), feats(3, 8, seed=8)
    adjust = losses.log_prior(counts, 1.0)
    torch.testing.assert_close(adjust, torch.log(counts / counts.sum()))
    ours = losses.prompt_ce_loss(img, txt, labels, 100.0, adjust)
    logits = 100.0 * img @ txt.T
    by_hand = torch.stack([-(logits[i] + adjust).log_softmax(0)[y] for i, y in enumerate(labels.tolist())]).mean()
    torch.testing.assert_close(ours["loss"], by_hand)
    torch.testing.assert_close(ours["logits"], logits)
    for a, b in zip(torch.autograd.grad(ours["loss"], (img, txt)), torch.autograd.grad(by_hand, (img, txt))):
        torch.testing.assert_close(a, b)
    assert losses.log_prior(counts, 0.0) is None
    torch.testing.assert_close(
        losses.prompt_ce_loss(img, txt, labels, 100.0, None)["loss"], naive_prompt_ce(img, txt, labels, 100.0)
    )


def test_the_frozen_tower_compiles_on_its_own():
    """`model.compile` in stage 2 with a frozen tower: the tower alone is compiled for inference
    (Inductor's freezing), the adapter around it stays eager and trains; the features match the
    eager tower's, and the training loop does not compile the whole module around it. A tower with
    a light module in it (LIFT) trains, so the whole module is compiled as before."""
    from ecvl_fast.method.model import Adapter, StageTwo
    from ecvl_fast.config import load_config
    from ecvl_fast.run import dist as D
    from ecvl_fast.training.loop import build_run

    torch.manual_seed(0)
    clip, _ = build_clip(ModelCfg(name="ecvl-tiny-vit"), res=32)
    net = ClipNet(clip).eval().requires_grad_(False)
    text = F.normalize(torch.randn(10, clip.text_projection.shape[1]), dim=-1)
    x = torch.randn(8, 3, 32, 32)
    eager = StageTwo(net, text, Adapter(text.shape[1], 0.2), None)
    compiled = StageTwo(net, text, eager.adapter, None, compile=True)
    assert compiled.compiled and not eager.compiled
    got, want = compiled(x)[0], eager(x)[0]
    assert torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    assert all(p.grad is not None for p in eager.adapter.parameters())
    assert all(p.grad is None for p in net.parameters())  # no graph through the tower
    # Inductor's freezing is on: the weights were folded in as constants at the first call, so a
    # weight changed afterwards (which a frozen tower's never is) reaches the eager tower only
    with torch.no_grad():
        net.clip.visual.proj.add_(torch.randn_like(net.clip.visual.proj))
    assert torch.equal(compiled(x)[0], got) and not torch.allclose(eager(x)[0], want, atol=1e-3)
    meta = {"classes": [f"c{i}" for i in range(10)], "train_labels": torch.arange(20).numpy() % 10}
    settings = ["model.name=ecvl-tiny-vit", "data.res=32", "model.compile=true", "stage2.init=none"]
    for row, outer in (([], False), (["stage2.adapter=false", "stage2.peft=bitfit"], True)):
        run = build_run(load_config(None, settings + row), D.setup("cpu"), meta, steps_per_epoch=1, stage=2)
        assert isinstance(run.trainable, torch._dynamo.eval_frame.OptimizedModule) == outer
        assert run.stage2.compiled == (not outer)
