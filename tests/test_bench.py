"""`ecvl-fast bench step|augment|train|infer` on CPU with the tiny model: the JSON schema and --compare."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ecvl_fast.bench.device import compare
from ecvl_fast.cli import main

MACHINE = {"date", "ecvl_fast", "commit", "cpus", "torch", "cuda", "gpu", "dali", "ffcv", "numba"}


def run_bench(tmp_path, args):
    out = tmp_path / f"{args[1]}.json"
    assert main([*args, "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["machine"]) == MACHINE and r["machine"]["cpus"] >= 1
    return r, out


def test_bench_step(tmp_path):
    r, _ = run_bench(
        tmp_path,
        ["bench", "step", "--model", "ecvl-tiny-vit", "--res", "32", "--batch", "8", "--steps", "2", "--repeats", "2"],
    )
    for stage in ("stage1", "stage2", "lift"):
        s = r[stage]
        assert s["img_s"] > 0 and s["img_s_total"] == s["img_s"] and s["world_size"] == 1
        assert s["first_step_s"] > 0 and s["peak_device_mem_gb"] is None  # CPU: no device memory
    assert r["stage2"]["encoder_forwards_s"] == pytest.approx(2 * r["stage2"]["img_s"])
    assert r["lift"]["encoder_forwards_s"] == pytest.approx(r["lift"]["img_s"])  # LIFT: one view per image
    # stage 2 trains the adapter; LIFT a light module and a cosine head: either a few percent of stage 1's
    assert 0 < max(r["stage2"]["trained_params"], r["lift"]["trained_params"]) < r["stage1"]["trained_params"] / 20


def test_bench_augment_train_infer_and_compare(tmp_path, capsys):
    r, _ = run_bench(
        tmp_path, ["bench", "augment", "--res", "32", "--batch", "32", "--images", "128", "--repeats", "1"]
    )
    assert (
        r["dali_img_s"] > 0 and r["peer_img_s"] > 0 and r["ratio"] == pytest.approx(r["dali_img_s"] / r["peer_img_s"])
    )
    assert "synthetic" in r["source"] and r["config"]["views"] == 2 and r["config"]["k"] == 2
    assert r["dali_peer_img_s"] > 0 and r["ratio_dali_peer"] == pytest.approx(r["dali_img_s"] / r["dali_peer_img_s"])
    r, path = run_bench(
        tmp_path,
        [
            "bench",
            "train",
            "--model",
            "ecvl-tiny-vit",
            "--res",
            "32",
            "--batch",
            "32",
            "--images",
            "128",
            "--epochs",
            "1",
        ],
    )
    for feeder in ("dali", "peer"):
        assert r[feeder]["img_s"] > 0 and 0 <= r[feeder]["data_stall"] < 1
    assert r["model_only_step_ms"] > 0 and r["ratio"] == pytest.approx(r["dali"]["img_s"] / r["peer"]["img_s"])
    old = json.loads(path.read_text())
    old["dali"]["img_s"] /= 2
    (tmp_path / "old.json").write_text(json.dumps(old))
    rows = {k: ratio for k, _, _, ratio in compare(r, old)}
    assert rows["dali.img_s"] == pytest.approx(2.0) and rows["peer.img_s"] == pytest.approx(1.0)
    capsys.readouterr()
    assert (
        main(
            [
                "bench",
                "infer",
                "--device",
                "cpu",
                "--model",
                "ecvl-tiny-vit",
                "--res",
                "32",
                "--images",
                "128",
                "--batch",
                "64",
                "--compare",
                str(tmp_path / "old.json"),
            ]
        )
        == 0
    )
    r, _ = run_bench(
        tmp_path, ["bench", "infer", "--model", "ecvl-tiny-vit", "--res", "32", "--images", "128", "--batch", "64"]
    )
    assert r["img_s"] > 0 and r["config"]["images"] == 128 and r["first_pass_s"] > 0 and not r["config"]["compile"]
    # the device check's summary (issue 30's keys), from these benchmarks' JSON as .ci/gpu-check.sh records it
    ci, results = Path(__file__).resolve().parent.parent / ".ci" / "results.py", tmp_path / "results.json"
    for name in ("augment", "train", "infer"):
        subprocess.run([sys.executable, ci, results, f"bench-{name}", "0", "1", tmp_path / f"{name}.json"], check=True)
    subprocess.run([sys.executable, ci, results, "--summary", tmp_path / "summary.json"], check=True)
    summary, got = json.loads((tmp_path / "summary.json").read_text()), {}
    for name in ("augment", "train", "infer"):
        got[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert list(summary) == [
        "device",
        "date",
        "commit",
        "step_img_s",
        "augment_img_s",
        "augment_peer_img_s",
        "augment_dali_peer_img_s",
        "train_img_s",
        "train_stall",
        "train_peer_img_s",
        "infer_img_s",
    ]
    assert (summary["device"], summary["step_img_s"]) == ("cpu", None)  # no step benchmark in this results file
    assert summary["augment_dali_peer_img_s"] == got["augment"]["dali_peer_img_s"]
    assert (summary["train_img_s"], summary["train_stall"]) == (
        got["train"]["dali"]["img_s_total"],
        got["train"]["dali"]["data_stall"],
    )
    assert summary["infer_img_s"] == got["infer"]["img_s"] and summary["commit"] == got["infer"]["machine"]["commit"]
    assert (
        main(
            [
                "bench",
                "step",
                "--device",
                "cpu",
                "--compare",
                str(tmp_path / "missing.json"),
                "--model",
                "ecvl-tiny-vit",
                "--res",
                "32",
                "--batch",
                "4",
                "--steps",
                "1",
                "--repeats",
                "1",
            ]
        )
        == 2
    )


def test_bench_profile_records_each_batch(tmp_path, capsys):
    """Issue 30's profile on CPU at the tiny size: every batch of the epoch has each part of the
    feed and the step; the parts the loop waits on add up to no more than the wall time; the top
    operators of a step come from torch.profiler."""
    r, _ = run_bench(
        tmp_path,
        ["bench", "profile", "--model", "ecvl-tiny-vit", "--res", "32", "--batch", "16", "--images", "64"],
    )
    from ecvl_fast.bench.device import PROFILE_KEYS

    assert r["batches"] == 4 and len(r["per_batch_ms"]) == 4 and r["config"]["dali_queue"] == 1  # CPU: synchronous
    assert all(set(b) == set(PROFILE_KEYS) and b["schedule_s"] > 0 and b["step_host_s"] > 0 for b in r["per_batch_ms"])
    wall = 4 * 16 / r["img_s"]
    assert sum(b["data_wait_s"] + b["step_host_s"] for b in r["per_batch_ms"]) / 1e3 <= wall * 1.05
    assert 0 <= r["data_stall"] < 1 and r["kernels"] and r["kernels"][0]["self_ms"] > 0
    assert "most self time per step" in capsys.readouterr().out
