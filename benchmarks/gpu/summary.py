"""The GPU check's one summary (``summary.json`` beside its results), rewritten after every step so that a run cut off
at its limit still says what it finished: each step's exit code and time, the gate, and the decision rows against
the targets that stand.

Targets (ViT-S/16 at 2×224 + 10×96 on one H100/H200): ≥ 1,800 img/s (milestone), ≥ 2,500 (goal), ≥ 3× the built-in
reference step and ≥ 4× the reference repository's own step in the same run; ViT-B/16 ≥ 45% MFU.

Standard library only (it runs between steps, in well under a second):
``python -m benchmarks.gpu.summary DIR [--step NAME --rc RC --seconds S --limit L]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = {"milestone_img_per_s": 1800, "goal_img_per_s": 2500, "vs_reference": 3.0, "vs_reference_repo": 4.0,
           "vit_b_mfu": 0.45}
REFERENCE_CROPS = "2x224+10x96"


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _records(folder: Path) -> dict[str, dict]:
    """Benchmark records in ``folder`` by file stem (decision_<device>, memory_<device>, ...)."""
    out = {}
    for f in sorted(folder.glob("*.json")):
        d = _load(f)
        if d and "rows" in d and f.name != "summary.json":
            out[f.stem] = d
    return out


def _fastest(record: dict) -> list[dict]:
    return record.get("fastest", []) if record else []


def targets(records: dict[str, dict]) -> dict:
    """The decision run's fastest ViT-S/16 and ViT-B/16 rows at the reference crops, against the targets."""
    decision = next((r for stem, r in records.items() if stem.startswith("decision")), None)
    out: dict = {"targets": TARGETS}
    for f in _fastest(decision):
        if f.get("mode") != "synthetic":
            continue
        key = {"vit_small_patch16_224": "vit_s16", "vit_base_patch16_224": "vit_b16"}.get(f["arch"])
        if key is None:
            continue
        rows = [r for r in decision["rows"] if r["extra"].get("arch") == f["arch"] and r["error"] is None]
        if not rows or rows[0]["extra"].get("crops") != REFERENCE_CROPS:
            continue
        best = out.get(key)
        if best is None or f["img_per_s"] > best["img_per_s"]:
            out[key] = f
    s, b = out.get("vit_s16"), out.get("vit_b16")
    verdict = {}
    if s:
        verdict.update(milestone=s["img_per_s"] >= TARGETS["milestone_img_per_s"],
                       goal=s["img_per_s"] >= TARGETS["goal_img_per_s"],
                       vs_reference=None if s.get("vs_reference") is None else
                       s["vs_reference"] >= TARGETS["vs_reference"],
                       vs_reference_repo=None if s.get("vs_reference_repo") is None else
                       s["vs_reference_repo"] >= TARGETS["vs_reference_repo"])
    if b and b.get("mfu") is not None:
        verdict["vit_b_mfu"] = b["mfu"] >= TARGETS["vit_b_mfu"]
    out["met"] = verdict
    return out


def summarise(folder: Path, step: dict | None = None) -> dict:
    path = folder / "summary.json"
    summary = _load(path) or {"steps": []}
    if step:
        summary["steps"].append(step)
    gate = _load(folder / "gate.json")
    summary["gate"] = {c["check"]: (c["ok"], c.get("error")) for c in gate["checks"]} if gate else None
    records = _records(folder)
    summary["files"] = sorted(p.name for p in folder.iterdir() if p.is_file())
    summary["errors"] = {stem: [f"{r['provider']} {r['shape']}: {r['error']}" for r in d["rows"] if r["error"]]
                         for stem, d in records.items()}
    summary["decision"] = targets(records)
    summary["fastest"] = {stem: _fastest(d) for stem, d in records.items() if _fastest(d)}
    path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--step")
    p.add_argument("--rc")
    p.add_argument("--seconds", type=float)
    p.add_argument("--limit", type=float)
    args = p.parse_args(argv)
    step = ({"step": args.step, "rc": args.rc, "seconds": args.seconds, "limit": args.limit}
            if args.step else None)
    s = summarise(Path(args.folder), step)
    if step is None:  # the final call: print what a reader checks first
        for st in s["steps"]:
            print(f"  {st['step']:<14} rc={st['rc']:<8} {st['seconds']:>5.0f} s of {st['limit']:.0f}")
        print(json.dumps({"gate": s["gate"], "decision": s["decision"]}, indent=1, default=str))


if __name__ == "__main__":
    main()
