"""The device check's results file: one JSON, rewritten (temp file, then rename) after every step,
so a check cut short still returns what finished. Standard library only.

  results.py FILE NAME RC SECONDS [STEP_JSON]     add a step (rc "skip": not run), with its JSON
  results.py FILE --files OUT                     fail unless OUT holds at most 8 files, none deeper than 2 folders
  results.py FILE --summary OUT.json              the run's headline figures (SUMMARY's keys, null where a step
                                                  did not finish): docs/gpu/summary-<device>-<date>.json
"""

import json
import os
import sys
from pathlib import Path

MAX_FILES, MAX_DEPTH = 8, 2  # what the device machine brings back from $OUT


def add(path: Path, name: str, rc: str, seconds: str, step_json: str | None) -> None:
    results = json.loads(path.read_text()) if path.is_file() else {"steps": []}
    entry = {"name": name, "rc": rc if rc == "skip" else int(rc), "seconds": int(seconds)}
    if step_json and Path(step_json).is_file():
        try:
            entry["result"] = json.loads(Path(step_json).read_text())
        except json.JSONDecodeError as e:
            entry["result"] = f"unreadable JSON: {e}"
    results["steps"] = [s for s in results["steps"] if s["name"] != name] + [entry]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


SUMMARY = (
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
)


def summary(path: Path) -> dict:
    """Issue 30's summary of a device check, from its results file: exactly SUMMARY's keys."""
    got = {
        s["name"]: s.get("result") for s in json.loads(path.read_text())["steps"] if isinstance(s.get("result"), dict)
    }

    def pick(step: str, *keys):
        value = got.get(step)
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    machine = next((r["machine"] for r in got.values() if isinstance(r.get("machine"), dict)), {})
    return {
        "device": machine.get("gpu") or "cpu",
        "date": machine.get("date"),
        "commit": machine.get("commit"),
        "step_img_s": pick("bench-step", "stage2", "img_s_total"),
        "augment_img_s": pick("bench-augment", "dali_img_s"),
        "augment_peer_img_s": pick("bench-augment", "peer_img_s"),
        "augment_dali_peer_img_s": pick("bench-augment", "dali_peer_img_s"),
        "train_img_s": pick("bench-train", "dali", "img_s_total"),
        "train_stall": pick("bench-train", "dali", "data_stall"),
        "train_peer_img_s": pick("bench-train", "peer", "img_s_total"),
        "infer_img_s": pick("bench-infer", "img_s"),
    }


def check_files(out: Path) -> int:
    files = [p for p in out.rglob("*") if p.is_file()]
    deep = [p for p in files if len(p.relative_to(out).parts) - 1 > MAX_DEPTH]
    for p in files:
        print(f"  {p.relative_to(out)}  {p.stat().st_size} bytes")
    if len(files) > MAX_FILES or deep:
        print(f"{out}: {len(files)} files (at most {MAX_FILES} come back), {len(deep)} deeper than {MAX_DEPTH} folders")
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[2] == "--files":
        sys.exit(check_files(Path(sys.argv[3])))
    if sys.argv[2] == "--summary":
        Path(sys.argv[3]).write_text(json.dumps(summary(Path(sys.argv[1])), indent=1) + "\n")
        sys.exit(0)
    add(Path(sys.argv[1]), *sys.argv[2:5], sys.argv[5] if len(sys.argv) > 5 else None)
