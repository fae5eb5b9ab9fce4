"""Fitting the user's stack: precision (bf16 / fp16 with a scaler / fp32), exact gradient
accumulation, and `export` to a slim .pt and ONNX that `predict` reads like a checkpoint."""

import numpy as np
import pytest
import torch
from PIL import Image

from ecvl_fast import EcvlError
from ecvl_fast.run import dist as D
from ecvl_fast.run import precision
from ecvl_fast.training import loop as training
from ecvl_fast.cli import main as cli_main
from ecvl_fast.config import AugCfg, Config, DataCfg, ModelCfg, RunCfg, Stage1Cfg, Stage2Cfg, load_config
from ecvl_fast.training.loop import build_run, train_step

from conftest import TINY

CLASSES = [f"digit {i}" for i in range(10)]


def batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    x = (labels.float() / 9 - 0.5)[:, None, None, None] * 2 + torch.randn(n, 3, 32, 32, generator=g) * 0.3
    return x.contiguous(memory_format=torch.channels_last), labels


def stage_run(stage, loss="prompt-ce", accum=1, prec="fp32", n=64, aug=AugCfg(), dcvl_weight=1.0, tau=0.0, labels=None):
    cfg = Config(
        data=DataCfg(res=32),
        model=ModelCfg(name="ecvl-tiny-vit"),
        run=RunCfg(device="cpu", precision=prec),
        aug=aug,
        stage1=Stage1Cfg(lr=2e-3, loss=loss, warmup_epochs=0.0, accum_steps=accum),
        stage2=Stage2Cfg(init="none", lr=1e-2, accum_steps=accum, dcvl_weight=dcvl_weight, logit_adjust=tau),
    )
    meta = {"classes": CLASSES, "train_labels": np.arange(n) % 10 if labels is None else labels}
    return build_run(cfg, D.Dist(0, 0, 1, torch.device("cpu")), meta, steps_per_epoch=10, stage=stage)


def params(run):
    return {k: v.detach().clone() for k, v in (run.stage2 or run.net).named_parameters()}


@pytest.mark.parametrize("stage,loss", [(1, "prompt-ce"), (1, "clip"), (2, "prompt-ce")])
def test_two_micro_batches_of_32_equal_one_batch_of_64(stage, loss):
    """Same parameters after a step, and in stage 2 the same per-sample L_DCVL in the bank."""
    x, y = batch()
    runs = [stage_run(stage, loss, accum) for accum in (1, 2)]
    for run in runs:  # plain SGD: the step is the gradient itself (Adam would blow up rounding noise
        # in zero-gradient parameters, such as attention key biases, into full-size steps)
        run.opt = torch.optim.SGD([p for p in (run.stage2 or run.net).parameters() if p.requires_grad], lr=0.5)
    before = params(runs[0])
    terms = []
    for run in runs:
        views = x if stage == 1 else [x, x.flip(-1)]
        terms.append(train_step(run, views, y, torch.arange(64)))
    after = [params(r) for r in runs]
    assert any(not torch.equal(before[k], after[0][k]) for k in before)  # the step changed something
    for k in before:  # the same update, to float rounding (summation order differs)
        step0, step1 = after[0][k] - before[k], after[1][k] - before[k]
        assert (step1 - step0).abs().max() <= 1e-5 * step0.abs().max() + 1e-7, k
    torch.testing.assert_close(terms[1]["loss"], terms[0]["loss"], rtol=1e-5, atol=1e-6)
    if stage == 2:
        torch.testing.assert_close(runs[1].bank.loss_sum, runs[0].bank.loss_sum, rtol=1e-5, atol=1e-6)


def test_ce_memory_records_each_samples_prompt_ce():
    """aug.m_source = "ce" (ECVL+): the bank's input is each sample's prompt CE, the mean of its
    two views' terms, not its L_DCVL; the loss that trains the adapter is unchanged."""
    import torch.nn.functional as F

    from ecvl_fast.method.model import adapted_features

    x, y = batch()
    views = [x, x.flip(-1)]
    runs = {src: stage_run(2, aug=AugCfg(m_source=src)) for src in ("ce", "dcvl")}
    start = {k: v.clone() for k, v in runs["dcvl"].stage2.adapter.state_dict().items()}
    runs["ce"].stage2.adapter.load_state_dict(start)
    with torch.no_grad():
        run = runs["ce"]
        ce = [
            F.cross_entropy(
                100.0 * adapted_features(run.net(v)[0], run.stage2.adapter) @ run.text.T, y, reduction="none"
            )
            for v in views
        ]
    terms = {src: train_step(r, views, y, torch.arange(64)) for src, r in runs.items()}
    torch.testing.assert_close(runs["ce"].bank.loss_sum, (ce[0] + ce[1]) / 2, rtol=1e-5, atol=1e-6)
    assert runs["ce"].bank.loss_count.tolist() == [1] * 64
    assert not torch.allclose(runs["dcvl"].bank.loss_sum, runs["ce"].bank.loss_sum)
    torch.testing.assert_close(terms["ce"]["loss"], terms["dcvl"]["loss"])
    # without the L_DCVL term (the ballad+ rows): the same CE memory, and L_DCVL is not computed
    plain = stage_run(2, aug=AugCfg(m_source="ce"), dcvl_weight=0.0)
    plain.stage2.adapter.load_state_dict(start)
    assert set(train_step(plain, views, y, torch.arange(64))) == {"loss", "ce"}
    torch.testing.assert_close(plain.bank.loss_sum, runs["ce"].bank.loss_sum)


def test_lol_memory_records_the_share_of_right_views():
    """aug.m_source = "lol": the bank's input is the share of each sample's two views whose top
    class is its label; its scope and direction must be said; its settings are checked."""
    from ecvl_fast.method.model import adapted_features

    x, y = batch()
    views = [x, x.flip(-1)]
    run = stage_run(2, aug=AugCfg(m_source="lol", m_scope="class", m_direction="easy"), dcvl_weight=0.0)
    with torch.no_grad():
        right = [
            ((adapted_features(run.net(v)[0], run.stage2.adapter) @ run.text.T).argmax(1) == y).float() for v in views
        ]
    assert set(train_step(run, views, y, torch.arange(64))) == {"loss", "ce"}
    torch.testing.assert_close(run.bank.loss_sum, (right[0] + right[1]) / 2)
    assert run.bank.lol == (10, 0.6)
    with pytest.raises(EcvlError, match='set aug.m_scope = "class" and aug.m_direction = "easy"'):
        stage_run(2, aug=AugCfg(m_source="lol", m_scope="class"))
    with pytest.raises(EcvlError, match=r"aug.lol_accept is an accuracy in \[0, 1\)"):
        load_config(None, ["aug.lol_accept=1.5"])
    with pytest.raises(EcvlError, match="aug.lol_levels must be at least 1"):
        load_config(None, ["aug.lol_levels=0"])


def test_accumulation_steps_must_be_positive():
    with pytest.raises(EcvlError, match="stage1.accum_steps must be at least 1"):
        load_config(None, ["stage1.accum_steps=0"])


def test_precision_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.dtype("auto", cpu) == torch.float32 and precision.dtype("auto", cuda) == torch.bfloat16
    assert precision.dtype("fp16", cpu) == torch.float16
    assert precision.scaler(cpu, torch.float16).is_enabled() and not precision.scaler(cpu, torch.bfloat16).is_enabled()
    with pytest.raises(EcvlError, match="run.precision must be one of"):
        load_config(None, ["run.precision=fp8"])


@pytest.mark.parametrize("prec", ["fp16", "fp32"])  # bf16: the GPU tests' default
def test_every_precision_trains_on_cpu(prec):
    run = stage_run(1, prec=prec)
    x, y = batch()
    first = float(train_step(run, x, y)["loss"])
    for _ in range(4):
        last = float(train_step(run, x, y)["loss"])
    assert np.isfinite(last) and last < first
    assert run.scaler.is_enabled() == (prec == "fp16") and run.amp == precision.DTYPES[prec]


def test_fp16_a_scaler_skipped_step_does_not_stop_the_run(tmp_path):
    """An epoch with one overflowing batch: under fp16 the scaler skips that step (and lowers its
    scale) and the epoch goes on; under fp32 the same batch stops the run with one line."""
    from ecvl_fast.run.logs import RunLog
    from ecvl_fast.training.loop import train_epoch

    x, y = batch()
    batches = [([x], y, torch.arange(64))] * 5
    batches[2] = ([x * float("inf")], y, torch.arange(64))
    run = stage_run(1, prec="fp16")
    run.out = tmp_path
    scale = run.scaler.get_scale()
    stats = train_epoch(run, batches, 0, RunLog(tmp_path, True, 1, 1, interactive=False))
    assert run.scaler.get_scale() < scale and np.isfinite(stats["train_loss"])
    assert all(torch.isfinite(p).all() for p in run.net.parameters())
    run = stage_run(1, prec="fp32")
    run.out = tmp_path
    with pytest.raises(EcvlError, match="non-finite loss at step 3"):
        train_epoch(run, batches, 0, RunLog(tmp_path, True, 1, 1, interactive=False))


def test_export_pt_and_onnx_predict_like_the_checkpoint(tmp_path, mnist, monkeypatch):
    """Real test digits, written as image files; the same top-1 from all three files."""
    from ecvl_fast.loaders.ffcv_loader import make_loader

    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(epochs=1, loss="prompt-ce") + '[stage2]\nepochs = 1\nlr = 1e-2\ninit = "none"\n')
    sets = [f"data.path={mnist}", f"run.out={tmp_path / 'run'}"]
    training.main(load_config(path, sets), stage=2)  # an adapter on the random encoders
    ckpt = tmp_path / "run" / "stage2" / "last.pt"
    folder = tmp_path / "digits"
    folder.mkdir()
    images, _, _ = next(iter(make_loader(mnist / "test.beton", "sequential", 48, 32)))
    for i, im in enumerate(images.numpy()):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    assert cli_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "model.pt")]) == 0
    assert cli_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "model.onnx"), "--format", "onnx"]) == 0
    from ecvl_fast.serving.predict import run_predict

    preds = {
        name: run_predict(tmp_path / name if name != "ckpt" else ckpt, [], folder, top_k=10, device="cpu")
        for name in ("ckpt", "model.pt", "model.onnx")
    }
    # compiled as one frozen graph: batches of 20, the last (8) padded to 20, so one compilation
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    preds["compiled"] = run_predict(
        tmp_path / "model.pt", [], folder, top_k=10, batch_size=20, device="cpu", compile=True
    )
    assert counters["stats"]["unique_graphs"] == graphs + 1
    with pytest.raises(EcvlError, match="not compiled by torch: drop --compile"):
        run_predict(tmp_path / "model.onnx", [], folder, compile=True)
    ref, classes = preds["ckpt"], torch.load(ckpt, weights_only=True)["classes"]
    assert len(preds["compiled"]) == len(ref) == 48
    for name, tol in (("model.pt", 1e-4), ("compiled", 1e-4), ("model.onnx", 1e-3)):
        assert [p.classes[0] for p in preds[name]] == [p.classes[0] for p in ref], name
        for a, b in zip(preds[name], ref):
            pa, pb = dict(zip(a.classes, a.probs)), dict(zip(b.classes, b.probs))
            assert max(abs(pa[c] - pb[c]) for c in classes) < tol, name
    # slimmer by at least the text tower and the training state
    state = torch.load(ckpt, weights_only=True)
    text_tower = sum(
        v.numel() * v.element_size() for k, v in state["model"].items() if not k.startswith("clip.visual.")
    )
    opt = sum(
        t.numel() * t.element_size()
        for s in state["optimizer"]["state"].values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    saved = ckpt.stat().st_size - (tmp_path / "model.pt").stat().st_size
    assert saved >= text_tower + opt - 10 * 512 * 4  # less the class text features it keeps
    # the stage-2 checkpoint keeps its class text features: read back, not encoded again, and as
    # encoding them again would give (its text tower is frozen in stage 2)
    from ecvl_fast.serving import classifier

    cfg, cpu = classifier.load_checkpoint(ckpt)[1], torch.device("cpu")
    encoded = classifier.load_scorer(cfg, {k: v for k, v in state.items() if k != "text"}, classes, cpu)
    monkeypatch.setattr(classifier, "class_text_features", None)  # encoding them would fail
    kept = classifier.load_scorer(cfg, state, classes, cpu)
    assert torch.allclose(kept.weights, encoded.weights, atol=1e-6) and torch.equal(kept.weights, state["text"])
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "optimizer" not in exported and "momentum" not in exported and exported["classes"] == classes
    assert exported["logit_scale"] == 100.0  # what prompt CE trained at (stage2.ce_scale), not the model's own
    # an export written before LIFT's settings (text_features; no light module, no test-time views) loads
    old = {
        k: v
        for k, v in exported.items()
        if k not in ("class_weights", "peft", "peft_dim", "tte_views", "tte_crops", "quick_gelu", "digest")
    }
    torch.save({**old, "text_features": exported["class_weights"]}, tmp_path / "old.pt")
    again = run_predict(tmp_path / "old.pt", [], folder, top_k=10, device="cpu")
    assert [p.probs for p in again] == [p.probs for p in preds["model.pt"]]


def test_export_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert cli_main(["export", "--ckpt", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "m.pt")]) == 2
    assert cli_main(["export", "--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err)
    assert not (tmp_path / "m.pt").exists()


def test_stage2_step_uses_the_logit_adjusted_loss():
    """stage2.logit_adjust = tau: the step's prompt CE is taken on logits + tau * log(train prior),
    the prior counted from the train labels; 0 leaves BALLAD's loss as it was."""
    import torch.nn.functional as F

    from ecvl_fast.method.model import adapted_features
    from ecvl_fast.training.loop import stage2_loss

    labels = np.repeat(np.arange(10), [19, 12, 9, 7, 5, 4, 3, 2, 2, 1])  # 64 train images, long-tailed
    x, y = batch()
    runs = {tau: stage_run(2, dcvl_weight=0.0, tau=tau, labels=labels) for tau in (0.0, 1.0)}
    assert runs[0.0].adjust is None
    prior = np.bincount(labels, minlength=10) / len(labels)
    torch.testing.assert_close(runs[1.0].adjust, torch.log(torch.tensor(prior, dtype=torch.float32)))
    idx = torch.arange(len(y))
    with torch.no_grad():
        run = runs[1.0]
        feats = torch.cat([run.net(x)[0], run.net(x.flip(-1))[0]])  # the two views
        logits = 100.0 * adapted_features(feats, run.stage2.adapter) @ run.text.T
        expect = F.cross_entropy(logits + run.adjust, y.repeat(2))
        got = stage2_loss(run, [x, x.flip(-1)], y, idx)["ce"]
    torch.testing.assert_close(got, expect)
