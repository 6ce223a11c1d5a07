"""Ship a layouts-study model: its finished checkpoint from runs/ into assets/, weights only (no optimiser state),
with a run record whose metrics are the study row's (the same weights, scored by lab.evaluate_unseen).

    python bench/ship_layouts.py layouts-g8-nunlimited-steps20000-t500k-in64-p16-crop-flat-s0-sym \
        --out assets/gridjepa_layouts_8x8.pt
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import results  # noqa: E402

import gridjepa_utils as g  # noqa: E402


def ship(row_id: str, out: Path) -> dict:
    """Re-save the row's run (runs/ under the CLI's name) at ``out`` and write its record; returns the record."""
    rows = {r["id"]: r for r in results.load("layouts_study")["rows"]}
    if row_id not in rows:
        raise SystemExit(f"no row {row_id!r} in assets/layouts_study.json")
    row = rows[row_id]
    cfg = g.config_from_dict(row["config"], row_id)
    ckpt = g.load_checkpoint(g.default_out_path(cfg), cfg, same_run=True)
    if ckpt["step"] != cfg.num_steps:
        raise SystemExit(f"{g.default_out_path(cfg)} stopped at step {ckpt['step']} of {cfg.num_steps}")
    metrics = {k: v for k, v in row.items() if k.startswith(("heldout_", "named_", "training_layouts_"))}
    metrics["train_seconds"] = ckpt["train_seconds"]
    g.save_checkpoint(out, ckpt["model_obj"], cfg, None, ckpt["step"], ckpt["history"], metrics, ckpt["train_seconds"])
    when = subprocess.run(
        ["git", "show", "-s", "--format=%cI", row["commit"].removesuffix("-dirty")], capture_output=True, text=True
    )
    evaluation = {"command": row["command"], "commit": row["commit"], "time": when.stdout.strip()}  # the row's commit
    evaluation |= {"device": row["device"], "metrics": metrics}
    record = {"kind": g.RECORD_KIND, "checkpoint": out.name, "config": row["config"]}
    record |= {"train_seconds": ckpt["train_seconds"], "device": row["trained_on"], "command": row["command"]}
    record |= {"study_row": row_id, "metrics": metrics, "evaluations": [evaluation]}
    g.write_record(out, record)
    return record


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", help="a layouts-study row id whose run is in runs/")
    parser.add_argument("--out", type=Path, required=True, help="the shipped checkpoint, assets/<name>.pt")
    args = parser.parse_args()
    record = ship(args.row, args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB; record {args.out.with_suffix('.json')}")
