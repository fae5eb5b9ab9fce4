"""Stage 1 end to end on tiny real data: loss falls, resume equivalence, DDP (gloo), bad input."""

import json

import numpy as np
import pytest
import torch

from ecvl_fast.cli import main as cli_main
from ecvl_fast import EcvlError
from ecvl_fast.run import checkpoint as ckpt_io
from ecvl_fast.method import losses
from ecvl_fast.training import loop as training
from ecvl_fast.config import load_config
from ecvl_fast.evaluation.reports import read_metrics
from ecvl_fast.loaders.convert import ConvertOptions, convert

from conftest import TINY, two_nodes


def tiny_config(tmp_path, mnist, name, epochs=3, loss="prompt-ce"):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(epochs=epochs, loss=loss))
    return path, ["data.path=" + str(mnist), "run.out=" + str(tmp_path / name)]


@pytest.fixture(scope="module")
def tiny_stage1(tmp_path_factory, mnist):
    """One stage-1 run (prompt CE, 1 epoch) that the stage-2 tests start from: (folder, metrics)."""
    tmp = tmp_path_factory.mktemp("stage1")
    path, sets = tiny_config(tmp, mnist, "s1", epochs=1)
    return tmp / "s1", training.main(load_config(path, sets))


def stage2_config(tmp_path, mnist, stage1_dir, name, extra=()):
    """The tiny config for a stage-2 run in tmp_path/name/stage2 from the shared stage-1 encoders."""
    path, sets = tiny_config(tmp_path, mnist, name, epochs=1)
    return load_config(path, sets + [f"stage2.init={stage1_dir / 'best.pt'}", *extra])


def epoch_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.mark.parametrize("loss", ["prompt-ce"])  # the CLIP loss: the DDP test and test_step_runs_on_cpu
def test_stage1_train_loss_falls(tmp_path, mnist, loss):
    path, sets = tiny_config(tmp_path, mnist, "run", epochs=4, loss=loss)
    metrics = training.main(load_config(path, sets))
    curve = epoch_losses(tmp_path / "run")
    assert len(curve) == 4 and curve[-1] < 0.95 * curve[0] and curve[-1] < curve[1], curve
    assert metrics["many"] > 0.3  # head classes are learned first; chance is 0.1
    for name in ("config.toml", "log.jsonl", "last.pt", "best.pt", "metrics.json", "per_class.png"):
        assert (tmp_path / "run" / name).exists()
    saved = ckpt_io.load(tmp_path / "run" / "last.pt", model_name="ecvl-tiny-vit", num_classes=10)
    assert saved["epoch"] == 4 and saved["config"]["stage1"]["loss"] == loss


@pytest.fixture(scope="module")
def stage1_pair(tmp_path_factory, mnist):
    """Stage 1 (CLIP loss, 1 epoch) in one process and as two torchrun agents acting as two nodes."""
    tmp = tmp_path_factory.mktemp("ddp")
    path, sets = tiny_config(tmp, mnist, "single", epochs=1, loss="clip")
    single = training.main(load_config(path, sets))
    _, sets = tiny_config(tmp, mnist, "ddp", epochs=1, loss="clip")
    # stage 2 then trains LIFT's LoRA and cosine head inside the DDP-wrapped frozen towers
    lift = ["stage2.peft=lora", "stage2.head=cosine", "stage2.epochs=1"]
    cmd = ["train", "--config", str(path)] + sum((["--set", s] for s in sets + lift), [])
    results = two_nodes(cmd, 29517)
    return tmp, path, single, results


def test_ddp_two_nodes_match_single_process(stage1_pair):
    tmp, _, single, results = stage1_pair
    for code, _, err in results:
        assert code == 0, err[-2000:]
    ddp = read_metrics(tmp / "ddp" / "metrics.json")
    a, b = (torch.load(tmp / r / "last.pt", weights_only=True)["model"] for r in ("single", "ddp"))
    # The same weights after an epoch: same samples, same global batch, gradients averaged. Not the
    # attention's in_proj_bias: its key third gets zero gradient (softmax ignores a shift), and
    # Adam turns that zero's rounding noise into full-size steps of either sign.
    for k in a:
        if not k.endswith("in_proj_bias"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
    a, b = epoch_losses(tmp / "single"), epoch_losses(tmp / "ddp")
    assert a[0] == pytest.approx(b[0], rel=1e-4)  # first epoch: same samples, same views, same math
    assert a[-1] == pytest.approx(b[-1], rel=2e-2)
    assert ddp["all"] == pytest.approx(single["all"], abs=0.03)
    assert ddp["num_images"] == single["num_images"] == 1000
    two = torch.load(tmp / "ddp" / "stage2" / "last.pt", weights_only=True)
    lora = [v for k, v in two["model"].items() if k.endswith("attn.b")]  # zero at the start: trained since
    assert lora and all(v.abs().sum() > 0 for v in lora) and two["head"] is not None


def test_elastic_restart_on_two_nodes_resumes_and_matches_one_process(stage1_pair, mnist):
    """Stage 2 on two torchrun agents acting as two nodes (c10d rendezvous on 127.0.0.1, one gloo
    worker each, `--max-restarts 1`); node 1's worker is SIGKILLed after the first checkpoint
    (step 5 of the epoch's 15). The agents stop the other worker and start both again; the same command
    resumes from that checkpoint and ends where one uninterrupted process ends: L_DCVL over the
    gathered global batch, so each sample's loss, its EMA and M are the same."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import worker_pid

    tmp, path, _, _ = stage1_pair
    stage2 = [f"data.path={mnist}", f"stage2.init={tmp / 'single' / 'best.pt'}", "stage2.epochs=1"]
    single = training.main(load_config(path, stage2 + [f"run.out={tmp / 'single'}"]), stage=2)
    run = tmp / "elastic"
    args = ["train", "--config", str(path), "--stage", "2"] + sum(
        (["--set", s] for s in stage2 + [f"run.out={run}", "run.checkpoint_every=5"]), []
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    with open(tmp / "torchrun.txt", "w+") as log:  # a file, not a pipe nobody reads while we wait
        agents = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "1",
                    "--max-restarts",
                    "1",
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    "127.0.0.1:29561",
                    "--rdzv-id",
                    "elastic",
                    "-m",
                    "ecvl_fast.cli",
                    *args,
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 300
        while not (run / "stage2" / "last.pt").exists():  # the main rank renames it into place when complete
            assert all(a.poll() is None for a in agents) and time.monotonic() < deadline, (
                tmp / "torchrun.txt"
            ).read_text()[-3000:]
            time.sleep(0.02)
        os.kill(worker_pid(agents[1].pid, 0), signal.SIGKILL)
        codes = [a.wait(timeout=300) for a in agents]
    out = (tmp / "torchrun.txt").read_text()
    assert codes == [0, 0], out[-3000:]
    assert "(exitcode: -9) local_rank: 0" in out  # the agent saw the kill and restarted the group
    log = [json.loads(line) for line in (run / "stage2" / "log.jsonl").read_text().splitlines()]
    resumed = [r for r in log if r.get("event") == "resumed"]
    # from a checkpoint (step 5, or 10 should the kill land late), not from scratch
    assert len(resumed) == 1 and resumed[0]["epoch"] == 1 and resumed[0]["step"] in (5, 10), resumed
    one, two = (ckpt_io.load(r / "stage2" / "last.pt")["momentum"] for r in (tmp / "single", run))
    assert torch.equal(one["seen"], two["seen"]) and one["seen"].sum() > 300  # one balanced epoch: ~40%
    torch.testing.assert_close(two["ema"], one["ema"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two["m"], one["m"], rtol=0, atol=1e-4)
    metrics = read_metrics(run / "stage2" / "metrics.json")
    assert metrics["all"] == pytest.approx(single["all"], abs=0.003)  # 3 of 1,000 test images


def test_resume_with_another_process_count_logs_the_epochs_loss(stage1_pair):
    """Two torchrun processes write a mid-epoch checkpoint (step 5 of the epoch's 15) and are
    killed; one process resumes it. The epoch's logged train_loss is the uninterrupted one's: the
    carried loss is per step, not a sum over the old number of ranks (which logged 12.16 for 7.24)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import worker_pid

    tmp, path, _, _ = stage1_pair
    run = tmp / "regrouped"
    sets = [
        f"data.path={load_config(tmp / 'single' / 'config.toml').data.path}",
        f"run.out={run}",
        "run.checkpoint_every=5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    with open(tmp / "regrouped.txt", "w+") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-port",
                "29583",
                "-m",
                "ecvl_fast.cli",
                "train",
                "--stage",
                "1",
                "--config",
                str(path),
            ]
            + sum((["--set", s] for s in sets), []),
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while not (run / "last.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "regrouped.txt").read_text()[-3000:]
            time.sleep(0.02)
        workers = [worker_pid(proc.pid, r) for r in (0, 1)]
        for pid in [p for p in workers if p] + [proc.pid]:  # the workers may sit in process groups of their own
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        while any(
            p and os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read() for p in workers
        ):
            time.sleep(0.02)
    stopped = ckpt_io.load(run / "last.pt")["position"]
    assert stopped["epoch"] == 0 and stopped["step"] in (5, 10)
    training.main(load_config(path, sets))  # one process now
    assert epoch_losses(run)[-1] == pytest.approx(epoch_losses(tmp / "single")[0], rel=1e-2)


def cli_error(args, capsys):
    capsys.readouterr()
    code = cli_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err, err
    assert err[-1].startswith("error:"), err
    return err[-1]


def test_bad_config_and_paths(tmp_path, mnist, capsys):
    path, sets = tiny_config(tmp_path, mnist, "bad")
    args = ["train", "--config", str(path)] + sum((["--set", s] for s in sets), [])
    assert "unknown key stage1.lrr" in cli_error(args + ["--set", "stage1.lrr=1"], capsys)
    assert "expected int" in cli_error(args + ["--set", "data.res=big"], capsys)
    assert "must be one of" in cli_error(args + ["--set", "stage1.loss=focal"], capsys)
    toml = tmp_path / "typo.toml"
    toml.write_text("[stage_1]\nepochs = 2\n")
    assert "unknown config section 'stage_1'" in cli_error(["train", "--config", str(toml)], capsys)
    assert "meta.json: missing" in cli_error(args + ["--set", f"data.path={tmp_path}/nowhere"], capsys)
    assert "no such pretrained checkpoint" in cli_error(args + ["--pretrained", "/no/such/weights.pt"], capsys)
    assert "stage 1 has no momentum bank" in cli_error(args + ["--set", "aug.randaug=true"], capsys)
    assert not (tmp_path / "bad" / "last.pt").exists()


def test_foreign_beton_and_wrong_checkpoint(tmp_path, mnist, capsys, split_dataset):
    import shutil

    data = tmp_path / "copy"
    shutil.copytree(mnist, data)
    shutil.copyfile(data / "test.beton", data / "train.beton")
    assert "train.beton does not match the sha256 meta.json recorded" in cli_error(
        ["eval", "--zero-shot", "--data", str(data), "--set", "model.name=ecvl-tiny-vit", "--set", "data.res=32"],
        capsys,
    )
    (data / "train.beton").write_bytes(b"\0" * 100)
    assert "train.beton" in cli_error(["eval", "--zero-shot", "--data", str(data)], capsys)
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    assert "not an ecvl-fast checkpoint" in cli_error(["eval", "--ckpt", str(junk), "--data", str(mnist)], capsys)
    path, sets = tiny_config(tmp_path, mnist, "short", epochs=1)
    training.main(load_config(path, sets))
    root, train, test = split_dataset
    other = tmp_path / "three-classes"
    convert(ConvertOptions("list", other, root=root, train_split=train, test_split=test, workers=1))
    last = tmp_path / "short" / "last.pt"
    assert "has 10 classes, the dataset 3" in cli_error(["eval", "--ckpt", str(last), "--data", str(other)], capsys)
    with pytest.raises(EcvlError, match="for model ecvl-tiny-vit"):
        ckpt_io.load(last, model_name="RN50")
    assert cli_main(["eval", "--ckpt", str(last), "--data", str(mnist)]) == 0
    assert json.loads((tmp_path / "short" / "eval-test" / "metrics.json").read_text())["num_images"] == 1000


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, mnist, monkeypatch):
    real, calls = losses.prompt_ce_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] == 20:  # epoch 2 (15 steps per epoch)
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(losses, "prompt_ce_loss", poisoned)
    path, sets = tiny_config(tmp_path, mnist, "nan", epochs=3)
    with pytest.raises(EcvlError, match="non-finite loss at step 20"):
        training.main(load_config(path, sets))
    kept = ckpt_io.load(tmp_path / "nan" / "last.pt")
    assert kept["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_zero_shot_eval_writes_report(tmp_path, mnist):
    out = tmp_path / "zs"
    args = [
        "eval",
        "--zero-shot",
        "--data",
        str(mnist),
        "--out",
        str(out),
        "--set",
        "model.name=ecvl-tiny-vit",
        "--set",
        "data.res=32",
        "--set",
        "model.templates=openai",
        "--set",
        "run.device=cpu",
    ]
    assert cli_main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 1000 and len(metrics["per_class"]) == 10
    assert (out / "per_class.png").stat().st_size > 1000
    # post-hoc logit adjustment: tau = 0 is the identity; tau = 2 moves predictions toward rare classes
    assert cli_main(args[:5] + [str(tmp_path / "tau0"), *args[6:], "--tau", "0"]) == 0
    assert cli_main(args[:5] + [str(tmp_path / "tau2"), *args[6:], "--tau", "2"]) == 0
    tau0, tau2 = (json.loads((tmp_path / t / "metrics.json").read_text()) for t in ("tau0", "tau2"))
    assert tau0["per_class"] == metrics["per_class"] and tau2["posthoc_tau"] == 2.0
    assert tau2["per_class"] != tau0["per_class"]


def test_stage2_trains_adapter_with_memory_driven_randaugment(tmp_path, mnist, tiny_stage1):
    stage1_dir, stage1 = tiny_stage1
    cfg = stage2_config(tmp_path, mnist, stage1_dir, "two", ["stage2.epochs=3", "stage2.lr=1e-2"])
    stage2 = training.main(cfg, stage=2)
    run = tmp_path / "two" / "stage2"
    saved = ckpt_io.load(run / "last.pt", model_name="ecvl-tiny-vit", num_classes=10)
    assert saved["stage"] == 2 and set(saved["adapter"]) == {"fc.weight", "fc.bias"}
    enc1 = ckpt_io.load(stage1_dir / "last.pt")["model"]
    assert all(torch.equal(enc1[k], v) for k, v in saved["model"].items())  # encoders stayed frozen
    m, seen = saved["momentum"]["m"], saved["momentum"]["seen"].bool()
    assert seen.sum() > 500 and m[seen].mean().item() == pytest.approx(0.5, abs=1e-4)  # eq. 9: mean 0.5
    assert min(m[seen].min().item(), 1 - m[seen].max().item()) < 1e-5  # the most extreme sample sits at 0 or 1
    assert m[seen].std() > 0.05 and (~seen).any()
    assert (run / "m_by_group.png").stat().st_size > 1000
    groups = [
        json.loads(line)["m_by_group"] for line in (run / "log.jsonl").read_text().splitlines() if "m_by_group" in line
    ]
    assert len(groups) == 3 and set(groups[-1]) == {"many", "medium", "few"}
    assert groups[-1]["few"]["seen"] == 1.0 and groups[-1]["many"]["seen"] < 1.0  # balanced sampling
    assert stage2 != stage1 and stage2["num_images"] == 1000
    assert cli_main(["eval", "--ckpt", str(run / "last.pt"), "--data", str(mnist), "--out", str(tmp_path / "ev")]) == 0
    again = read_metrics(tmp_path / "ev" / "metrics.json")
    assert again["all"] == stage2["all"] and again["few"] == stage2["few"]  # eval applies the adapter too


def test_training_reads_the_banks_m_each_epoch(tmp_path, mnist, monkeypatch, tiny_stage1):
    """The loader is handed the bank: what it feeds DALI in epoch t+1 is the bank's M after epoch t."""
    from ecvl_fast.kernels.bank import MomentumBank
    from ecvl_fast.loaders import dali_loader

    after_epoch, fed = [], []
    real_end, real_feed = MomentumBank.end_epoch, dali_loader.feed

    def end_epoch(bank, *a, **kw):
        real_end(bank, *a, **kw)
        after_epoch.append(bank.m.clone())

    def feed(p, spec, images, m, draws):
        if spec.randaug:
            fed.append(np.asarray(m).copy())
        return real_feed(p, spec, images, m, draws)

    monkeypatch.setattr(MomentumBank, "end_epoch", end_epoch)
    monkeypatch.setattr(dali_loader, "feed", feed)
    cfg = stage2_config(tmp_path, mnist, tiny_stage1[0], "reads", ["stage2.epochs=2", "data.prefetch=0"])
    training.main(cfg, stage=2)
    steps = len(fed) // 2
    assert len(after_epoch) == 2 and steps == 15
    assert all((m == 0).all() for m in fed[:steps])  # epoch 1: M = 0, no augmentation yet
    bank_m = after_epoch[0].numpy()
    assert all(np.isin(m, bank_m).all() for m in fed[steps:]) and np.concatenate(fed[steps:]).std() > 0.05


def test_predict_matches_eval_and_handles_bad_input(tmp_path, mnist, capsys, tiny_stage1):
    from PIL import Image

    from ecvl_fast.run import dist as D
    from ecvl_fast.training.data import eval_loader
    from ecvl_fast.serving.classifier import load_scorer
    from ecvl_fast.evaluation.metrics import predict_split
    from ecvl_fast.loaders.sources import load_mnist_lt

    cfg = stage2_config(tmp_path, mnist, tiny_stage1[0], "p", ["stage2.epochs=1"])
    training.main(cfg, stage=2)
    ckpt = tmp_path / "p" / "stage2" / "last.pt"
    test = load_mnist_lt(100, 0).splits["test"]  # the same real digits, in the test split's order
    folder = tmp_path / "imgs"
    folder.mkdir()
    n = 200
    for i in range(n):
        Image.fromarray(test.images[i]).save(folder / f"{i:04d}.png")
    out = tmp_path / "preds.csv"
    assert (
        cli_main(
            [
                "predict",
                "--ckpt",
                str(ckpt),
                "--folder",
                str(folder),
                "--top-k",
                "3",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    rows = out.read_text().splitlines()
    assert rows[0] == "path,class1,prob1,class2,prob2,class3,prob3" and len(rows) == n + 1
    state = ckpt_io.load(ckpt)
    scorer = load_scorer(cfg, state, state["classes"], torch.device("cpu"))
    d = D.Dist(0, 0, 1, torch.device("cpu"))
    ref, _ = predict_split(scorer, eval_loader(cfg, d, "test"), d)
    top1 = [r.split(",")[1] for r in rows[1:]]
    agree = np.mean([t == state["classes"][p] for t, p in zip(top1, ref[:n])])
    assert agree >= 0.97, agree  # the same preprocessing up to resampling round-off
    probs = [float(r.split(",")[2]) for r in rows[1:]]
    assert all(0 < p <= 1 for p in probs)
    # Bad inputs: an unreadable image is named and skipped, or refused with --strict.
    (folder / "broken.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert (
        cli_main(["predict", "--ckpt", str(ckpt), "--folder", str(folder), "--device", "cpu", "--out", str(out)]) == 0
    )
    assert "broken.png" in capsys.readouterr().err and len(out.read_text().splitlines()) == n + 1
    assert "broken.png: unreadable image" in cli_error(
        ["predict", "--ckpt", str(ckpt), "--device", "cpu", "--strict", str(folder / "broken.png")], capsys
    )
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": state["model"]}, weights)
    assert "not an ecvl-fast checkpoint" in cli_error(
        ["predict", "--ckpt", str(weights), str(folder / "0000.png")], capsys
    )
    assert "no such folder" in cli_error(["predict", "--ckpt", str(ckpt), "--folder", str(tmp_path / "none")], capsys)


def test_fixed_magnitude_replaces_the_memory(tmp_path, mnist, monkeypatch, tiny_stage1):
    from ecvl_fast.loaders import dali_loader

    fed, real_feed = [], dali_loader.feed
    monkeypatch.setattr(
        dali_loader,
        "feed",
        lambda p, spec, images, m, draws: (
            fed.append(np.asarray(m).copy()) if spec.randaug else None,
            real_feed(p, spec, images, m, draws),
        )[1],
    )
    with pytest.raises(EcvlError, match="a fixed M lies in"):
        training.main(stage2_config(tmp_path, mnist, tiny_stage1[0], "fixed", ["stage2.randaug_m=1.5"]), stage=2)
    training.main(
        stage2_config(tmp_path, mnist, tiny_stage1[0], "fixed", ["stage2.epochs=1", "stage2.randaug_m=0.5"]), stage=2
    )
    assert len(fed) == 15 and all((m == 0.5).all() for m in fed)
