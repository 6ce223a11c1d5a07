"""The layouts recipe (worlds never seen, notebook 05) trained on a GPU for a wall-clock budget, then evaluated on
the held-out layouts by ``python gridjepa_utils.py --layouts procedural`` and by lab.evaluate_unseen (every planner
and memory, as the layouts study scores a model), whose figures the run record gets as a later evaluation.

    python bench/gpu_layouts.py --seconds 400 --out runs/gridjepa_layouts_gpu.pt

(The shipped ``assets/gridjepa_layouts_gpu.pt`` was made this way on an H100: 8,000 steps of batch 256, which the
``layouts_gpu`` profile now holds, so ``python gridjepa_utils.py --layouts procedural`` on a GPU repeats it.)

It times the recipe's training step on the GPU first (bf16 autocast, as train() runs it), picks the number of
steps that fits the budget less ``--eval-seconds`` (rounded down to a multiple of 500, at least 500), and then runs
the command line with ``--steps`` and ``--batch-size``: the run record beside the checkpoint holds that command,
the device and the training time, so the run can be repeated on any machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab  # noqa: E402
from studies import LAYOUTS_SIZE_OVERRIDES, UNLIMITED_LAYOUTS  # noqa: E402

import gridjepa_utils as g  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, required=True, help="wall-clock budget for training + evaluation")
    parser.add_argument("--eval-seconds", type=float, default=120, help="kept back for the evaluation (default 120)")
    parser.add_argument("--batch-size", type=int, default=g.PROFILES["layouts_gpu"]["batch_size"])
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--out", help="checkpoint path ending in .pt (5x5)")
    parser.add_argument(
        "--grid-size",
        type=int,
        default=5,
        help="5: train and evaluate through the command line. Another size (the command line trains 5x5 only): train "
        "only, to runs/ under the name bench/studies.py layouts gives that run, and write <name>.gpu.json beside it; "
        "the study evaluates it on the CPU (the command is printed)",
    )
    parser.add_argument("--cpu", action="store_true", help="allow a CPU run (checks the script; tiny budget)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if not (torch.cuda.is_available() or args.cpu):
        raise SystemExit("no CUDA device: pass --cpu to check the script on the CPU")
    if args.seconds <= 0 or args.eval_seconds < 0 or args.batch_size < 1 or args.max_steps < 1:
        parser.error("--seconds must be > 0, --eval-seconds >= 0, --batch-size and --max-steps >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.grid_size == 5 and (args.out is None or not args.out.endswith(".pt")):
        parser.error("--out must be a checkpoint path ending in .pt")
    over = {"grid_size": args.grid_size, "batch_size": args.batch_size, "num_layouts": UNLIMITED_LAYOUTS}
    over |= LAYOUTS_SIZE_OVERRIDES.get(args.grid_size, {})
    cfg = g.make_config("layouts_gpu", **over)
    world = g.build_world(cfg)  # 50,000 generated layouts: built once
    est = lab.estimate_train_time(cfg, device, timed_steps=30 if device.type == "cuda" else 3, world=world)
    left = args.seconds - (time.perf_counter() - t0) - args.eval_seconds
    steps = min(args.max_steps, max(500, int(left / est["seconds_per_step"]) // 500 * 500))
    print(
        f"{g.describe_device(device)}: layouts recipe on {args.grid_size}x{args.grid_size} at batch {args.batch_size}, "
        f"{est['seconds_per_step'] * 1e3:.1f} ms per step -> {steps:,} steps in {left:.0f} s",
        flush=True,
    )
    if args.grid_size != 5:
        cfg = g.make_config("layouts_gpu", **over, num_steps=steps)
        out = g.default_out_path(cfg)
        run = g.train(cfg, world=world, ckpt_path=out, progress=False, device=device)
        evaluate = (
            f"python bench/studies.py layouts --profile layouts_gpu --steps {steps} --sizes {args.grid_size} "
            "--counts unlimited"
        )
        note = {
            "device": g.describe_device(device),
            "grid_size": args.grid_size,
            "batch_size": args.batch_size,
            "num_steps": steps,
            "seconds_per_step": est["seconds_per_step"],
            "train_seconds": run.total_train_seconds,
            "checkpoint": out.name,
            "evaluate_with": evaluate,
        }
        out.with_suffix(".gpu.json").write_text(json.dumps(note, indent=2) + "\n")
        print(f"trained in {run.total_train_seconds:.0f} s: {out}\nevaluate with: {evaluate}")
        return note
    argv_run = ["--layouts", "procedural", "--profile", "layouts_gpu", "--steps", str(steps)]
    argv_run += ["--batch-size", str(args.batch_size)]
    metrics = g.main([*argv_run, "--out", args.out])
    model, cfg, _ = g.load_run(args.out)  # on the CPU, as the command line evaluates
    table = lab.evaluate_unseen(model, g.build_world(cfg))
    with g.output_lock(args.out):
        record = g.read_record(args.out, cfg)
        command = shlex.join(["python", "bench/gpu_layouts.py", *(sys.argv[1:] if argv is None else argv)])
        evaluation = {"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        record["evaluations"].append(evaluation | {"device": g.describe_device(torch.device("cpu")), "metrics": table})
        g.write_record(args.out, record)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return metrics | table


if __name__ == "__main__":
    main()
