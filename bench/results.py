"""The one writer of study results: assets/<study>.json = {"study": name, "rows": [row, ...]}, each row keyed by its id.

    rows = results.load("layouts_study")["rows"]
    results.append_rows("layouts_study", [results.provenance("layouts-g5-n2000-s0", cfg) | measured])

append_rows takes a file lock, re-reads the file under it and replaces it atomically (temp file, fsync,
os.replace), so a kill mid-write or two studies writing at once lose no row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from filelock import FileLock

ASSETS = Path(__file__).resolve().parents[1] / "assets"
REQUIRED = ("id", "config", "device", "commit", "command")  # what every row says of where it came from


SHORT = {  # how a Config field reads in a row id
    "grid_size": "g",
    "input_size": "in",
    "patch_size": "p",
    "num_transitions": "t",
    "num_steps": "steps",
    "smooth_weight": "w",
    "smooth_ramp": "ramp",
    "latent_dim": "d",
    "seq_len": "T",
    "rollout_weight": "rollout",
    "batch_size": "b",
    "pred_depth": "pred-depth",
    "pred_width": "pred-width",
    "num_layouts": "n",
}


def number(v) -> str:
    """1 -> "1", 0.5 -> "0.5", 250000 -> "250k"."""
    if isinstance(v, int) and v >= 1000 and v % 1000 == 0:
        return f"{v // 1000}k"
    return f"{v:g}" if isinstance(v, float) else str(v)


def slug(overrides: dict, empty: str = "recipe") -> str:
    """A readable id part for a row's Config overrides, in a fixed order: {"input_size": 64, "crop": True,
    "num_transitions": 500_000} -> "in64-crop-t500k"; no overrides -> ``empty``."""
    order = (
        "layout",
        "num_steps",
        "smooth_weight",
        "smooth_ramp",
        "lam",
        "latent_dim",
        "seq_len",
        "rollout_weight",
        "batch_size",
        "num_transitions",
        "input_size",
        "patch_size",
        "crop",
        "pool",
        "stem",
        "depth",
        "width",
        "pred_depth",
        "pred_width",
        "spatial",
    )
    keys = sorted(overrides, key=lambda k: (order.index(k) if k in order else len(order), k))
    parts = []
    for k in keys:
        v = overrides[k]
        if isinstance(v, bool):
            parts.append(k.replace("_", "-") if v else f"no-{k.replace('_', '-')}")
        elif isinstance(v, str):
            parts.append({"pool": "", "stem": "stem-"}.get(k, "") + v.replace("_", "-"))
        else:
            parts.append(SHORT.get(k, k.replace("_", "-")) + number(v))
    return "-".join(parts) or empty


def path_of(study: str | Path) -> Path:
    """A study's file: a path as given, or a name (with or without .json) in assets/."""
    path = Path(study)
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    return path if path.is_absolute() or path.parent != Path(".") else ASSETS / path


def load(study: str | Path) -> dict:
    """A study's {"study", "rows"}; a file that is missing reads as no rows. An unreadable or truncated file is an
    error naming its path (and is left as it is)."""
    path = path_of(study)
    if not path.exists():
        return {"study": path.stem, "rows": []}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable study file ({err}); fix or remove it by hand") from err
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a study file (expected an object with a 'rows' list)")
    return data


def _default(o):
    return o.tolist() if isinstance(o, np.ndarray | np.generic) else str(o)


def append_rows(study: str | Path, rows: list[dict], name: str | None = None) -> Path:
    """Add rows to a study's file under its lock; a row whose id is already there replaces it (said on stderr)."""
    path = path_of(study)
    missing = [(r.get("id"), k) for r in rows for k in REQUIRED if k not in r]
    if missing:
        raise ValueError(f"{path}: rows without {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        data = load(path)
        data["study"] = data.get("study") or name or path.stem
        where = {r["id"]: i for i, r in enumerate(data["rows"])}
        for row in rows:
            if row["id"] in where:
                print(f"{path.name}: row {row['id']} replaced", file=sys.stderr)
                data["rows"][where[row["id"]]] = row
            else:
                where[row["id"]] = len(data["rows"])
                data["rows"].append(row)
        write_json(path, data)
    return path


def write_json(path: str | Path, data) -> Path:
    """Replace a JSON file atomically (a temp file beside it, fsync, os.replace): a kill mid-write leaves the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2, default=_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def git_commit() -> str:
    """HEAD's sha, with "-dirty" when the tree has uncommitted changes; "unknown" without git."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance(row_id: str, cfg, device: str, argv: list[str] | None = None, commit: str | None = None) -> dict:
    """A row's first fields: its id, the full Config it trained with, the device, the commit and the command."""
    argv = sys.argv if argv is None else argv
    command = shlex.join(["python", *argv]) if argv and argv[0].endswith(".py") else shlex.join(argv)
    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return {"id": row_id, "config": config, "device": device, "commit": commit or git_commit(), "command": command}
