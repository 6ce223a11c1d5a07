"""GPU check: throughput and model FLOP utilisation of the cpu, gpu and full profiles, then the gpu profile
trained to its headline metrics. Writes assets/gpu_benchmark.json. Meant to finish in under 8 minutes on one
data-centre GPU (bench/gpu_check.sh runs it with a time limit).

    python bench/gpu_check.py            # on a CUDA machine
    python bench/gpu_check.py --dry      # on the CPU with the smoke profile, in seconds (what CI runs)

Per profile: steps/s and images/s of training steps (bf16 autocast on CUDA, as train() runs them), FLOPs per step
counted by torch's FlopCounterMode (forward + backward), achieved FLOP/s and MFU = achieved / the device's peak
dense bf16 FLOP/s (from the table below; null for a device not in it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab  # noqa: E402

import gridjepa_utils as g  # noqa: E402

# Peak dense bf16 tensor-core FLOP/s by device name (vendor data sheets; no sparsity). First match wins.
PEAK_BF16_FLOPS = (
    (r"H100.*PCIe", 756e12),
    (r"H100|H200|GH200", 989e12),
    (r"A100", 312e12),
    (r"\bL4\b", 121e12),
    (r"\bT4\b", 65e12),
)


def peak_flops(device_name: str) -> float | None:
    """The peak dense bf16 FLOP/s of a device by its name, or None when it is not in the table."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


def measure(profile: str, device: torch.device, steps: int, peak: float | None) -> dict:
    cfg = g.make_config(profile)
    est = lab.estimate_train_time(cfg, device, timed_steps=steps)
    steps_per_s = 1 / est["seconds_per_step"]
    achieved = est["flops_per_step"] * steps_per_s
    row = {
        "batch_size": cfg.batch_size,
        "input_size": cfg.input_size,
        "parameters": g.count_parameters(g.JEPA(cfg)),
        "timed_steps": steps,
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * cfg.batch_size * cfg.seq_len,
        "flops_per_step": est["flops_per_step"],
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "full_run_estimate_s": est["total_seconds"],
        "num_steps": cfg.num_steps,
    }
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a (peak unknown)"
    print(
        f"{profile:6s} {row['steps_per_s']:8.1f} steps/s {row['images_per_s']:10,.0f} images/s "
        f"{est['flops_per_step'] / 1e9:8.1f} GFLOP/step {row['achieved_tflops']:7.2f} TFLOP/s  MFU {mfu}  "
        f"-> {cfg.num_steps:,} steps ~ {est['total_seconds'] / 60:.1f} min"
    )
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, smoke profile, a few steps: checks the script")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per profile (default 30; dry 3)")
    parser.add_argument("--out", default=None, help="JSON path (default assets/gpu_benchmark.json; dry: runs/)")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    if args.dry:
        device, profiles, train_profile = torch.device("cpu"), ["smoke"], "smoke"
        out = Path(args.out or g.REPO_ROOT / "runs" / "gpu_benchmark_dry.json")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry to check the script on the CPU")
        device, profiles, train_profile = torch.device("cuda"), ["cpu", "gpu", "full"], "gpu"
        out = Path(args.out or g.ASSETS / "gpu_benchmark.json")
        torch.backends.cuda.matmul.allow_tf32 = True
    steps = args.steps or (3 if args.dry else 30)
    name = g.describe_device(device)
    peak = peak_flops(name) if device.type == "cuda" else None
    print(f"device: {name} | torch {torch.__version__} | peak bf16 {peak / 1e12 if peak else 'unknown'} TFLOP/s")
    rows = {p: measure(p, device, steps, peak) for p in profiles}

    cfg = g.make_config(train_profile)
    print(f"training the {train_profile} profile: {cfg.num_steps:,} steps of batch {cfg.batch_size} ...", flush=True)
    result = g.train(cfg, progress=False, device=device)
    metrics = g.evaluate(result.model, result.world, cfg)
    print(
        f"{train_profile}: trained in {result.train_seconds:.0f} s; next-state accuracy "
        f"{metrics['next_state_accuracy']:.3f}, planning {metrics['plan_success']:.1%} solved "
        f"({metrics['plan_optimal']:.1%} optimal), latent std {metrics['latent_std']:.2f}"
    )
    report = {
        "device": name,
        "torch": torch.__version__,
        "dry": args.dry,
        "peak_bf16_flops": peak,
        "profiles": rows,
        "train": {"profile": train_profile, "train_seconds": result.train_seconds, **metrics},
        "total_seconds": time.perf_counter() - t_start,
        "command": "python bench/gpu_check.py" + (" --dry" if args.dry else ""),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['total_seconds']:.0f} s in all)")
    return report


if __name__ == "__main__":
    main()
