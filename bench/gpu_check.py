"""GPU check: the one command for a CUDA machine. It runs these phases (``--phases``, any of them, in this order):

  speed  per profile (cpu, gpu, full), a training step eager and through torch.compile (Config.compile; CUDA graphs
         on a GPU), side by side: steps/s, images/s, FLOPs per step (forward + backward, by torch's FlopCounterMode),
         achieved FLOP/s and MFU = achieved / the device's peak dense bf16 FLOP/s (table below; null off it), the
         warm-up (compiling) timed apart, and compiled steps/s over eager.
  gpu    the gpu profile trained end to end and evaluated by g.evaluate (next-state accuracy, probe plans, PC1+PC2,
         held-out R², plans on the latent cost alone), twice: its recipe, and the original write-up's objective
         (lam=10, smooth_weight=0). Each run takes the path, eager or compiled, whose estimated time for it
         (compiling included) is shorter. ``--gpu-steps N`` cuts the schedule to N steps.
  full   the same for the full profile; ``--full-steps N`` cuts its schedule (warm-up capped at a quarter of N,
         cosine decay to 0 at N) to N steps, ``--full-steps fit`` to as many as fit in the time left.

A time guard: before each measurement and run, its time is estimated (a run's from the measured steps/s); one that
would not end within ``--time-limit`` seconds (default 540) of the start is skipped, and recorded as skipped with
its estimate. The report is rewritten atomically after every measurement and run, with the commit: a call cut short
keeps what it finished. A later call adds to the report of an earlier one on the same device (``--add-to``; by default
the ``--out`` file), reusing its speed rows to choose paths; ``--fresh`` starts a new report.

On one GPU, two calls of at most 600 s each (bench/gpu_check.sh adds a hard timeout):

    bench/gpu_check.sh --fresh --phases speed,gpu                  # the three profiles' speed, the two gpu runs
    bench/gpu_check.sh --phases full --full-steps fit              # the two full runs, as many steps as fit

Or one call for all three phases, the full runs cut to what is left of it (``--time-limit`` to share a budget):

    bench/gpu_check.sh --fresh --full-steps fit

Each writes assets/gpu_benchmark.json; with ``--out DIR/gpu_benchmark.json`` elsewhere, a second call takes
``--add-to`` the first call's report. On the CPU in a minute or two, every phase on the smoke profile and a few steps
(what the tests run; writes runs/gpu_benchmark_dry.json):

    python bench/gpu_check.py --dry
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab  # noqa: E402
import results  # noqa: E402

import gridjepa_utils as g  # noqa: E402

# Peak dense bf16 tensor-core FLOP/s by device name (vendor data sheets; no sparsity). First match wins.
PEAK_BF16_FLOPS = (
    (r"H100.*PCIe", 756e12),
    (r"H100|H200|GH200", 989e12),
    (r"A100", 312e12),
    (r"\bL4\b", 121e12),
    (r"\bT4\b", 65e12),
)
FORMAT = 2  # the report's layout: per-profile eager and compiled rows, trained runs keyed by id
PATHS = ("eager", "compiled")
OBJECTIVES = {"recipe": {}, "writeup": {"lam": 10.0, "smooth_weight": 0.0}}  # the profile as is; the write-up's loss
SPEED_ALLOWANCE_S = {"eager": 30.0, "compiled": 150.0}  # a speed measurement's time, for the guard
EVAL_ALLOWANCE_S = 30.0  # an evaluation's time until one is measured
MARGIN = 1.15  # on a run's time per step: the evaluations during training, the loss logged


def peak_flops(device_name: str) -> float | None:
    """The peak dense bf16 FLOP/s of a device by its name, or None when it is not in the table."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


def compile_counters() -> dict:
    """torch.compile's running counts: graphs compiled, graph breaks, graphs that could not run as CUDA graphs."""
    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())} | {
        "cudagraph_skips": skips
    }


def failure(err: Exception) -> dict:
    """A measurement's or run's row when it raised: what it raised (the GPU's cache freed for the next)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000]}


def measure(cfg: g.Config, device: torch.device, steps: int, peak: float | None) -> tuple[dict, int]:
    """One profile's training step on one path (cfg.compile): its speed row and its FLOPs."""
    if cfg.compile:
        torch._dynamo.reset()  # compiled from scratch, as train() compiles in a fresh process
    before = compile_counters()
    est = lab.estimate_train_time(cfg, device, timed_steps=steps)
    steps_per_s = 1 / est["seconds_per_step"]
    achieved = est["flops_per_step"] * steps_per_s
    row = {
        "status": "done",
        "timed_steps": steps,
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * cfg.batch_size * cfg.seq_len,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "warmup_steps": est["warmup_steps"],
        "warmup_seconds": est["warmup_seconds"],
        "paint_seconds": est["paint_seconds"],
        "full_run_estimate_s": est["total_seconds"],
    }
    if cfg.compile:
        row |= {k: v - before[k] for k, v in compile_counters().items()}
    return row, est["flops_per_step"]


def speed(profile: str, device: torch.device, steps: dict, peak: float | None, left) -> dict:
    """A profile's training step eager and compiled, side by side, with compiled steps/s over eager."""
    cfg = g.make_config(profile)
    entry = {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "input_size": cfg.input_size}
    entry |= {"parameters": g.count_parameters(g.JEPA(cfg)), "num_steps": cfg.num_steps}
    for path in PATHS:
        if left() < SPEED_ALLOWANCE_S[path]:
            entry[path] = {"status": "skipped", "estimate_s": SPEED_ALLOWANCE_S[path], "time_left_s": left()}
            print(f"{profile:6s} {path:8s} skipped: ~{SPEED_ALLOWANCE_S[path]:.0f} s, {left():.0f} s left")
            continue
        try:
            entry[path], entry["flops_per_step"] = measure(
                dataclasses.replace(cfg, compile=path == "compiled"), device, steps[path], peak
            )
        except Exception as err:  # recorded, and the other path still measured
            entry[path] = failure(err)
            print(f"{profile:6s} {path:8s} failed: {entry[path]['error'][:300]}")
            continue
        row = entry[path]
        mfu = f"{row['mfu']:.2%}" if row["mfu"] is not None else "n/a"
        print(
            f"{profile:6s} {path:8s} {row['steps_per_s']:8.1f} steps/s {row['images_per_s']:10,.0f} images/s "
            f"{entry['flops_per_step'] / 1e9:8.2f} GFLOP/step {row['achieved_tflops']:7.3f} TFLOP/s  MFU {mfu}  "
            f"warm-up {row['warmup_seconds']:.1f} s"
        )
    if all(entry[p]["status"] == "done" for p in PATHS):
        entry["compiled_over_eager"] = entry["compiled"]["steps_per_s"] / entry["eager"]["steps_per_s"]
        print(f"{profile:6s} compiled/eager steps/s: {entry['compiled_over_eager']:.2f}x")
    return entry


def shorten(cfg: g.Config, num_steps: int | None) -> g.Config:
    """cfg's schedule cut to num_steps: warm-up capped at a quarter of them, cosine decay to 0 at the last."""
    if num_steps is None or num_steps >= cfg.num_steps:
        return cfg
    return dataclasses.replace(cfg, num_steps=num_steps, warmup_steps=min(cfg.warmup_steps, num_steps // 4))


def run_estimate(entry: dict, path: str, num_steps: int, eval_s: float) -> float | None:
    """Seconds a run of num_steps takes on a path, from its speed row (None without one): compiling, steps, painting
    and the evaluation."""
    row = entry.get(path, {})
    if row.get("status") != "done":
        return None
    warm = row["warmup_seconds"] if path == "compiled" else 0.0
    return warm + MARGIN * num_steps / row["steps_per_s"] + row["paint_seconds"] + eval_s


def fit_steps(entry: dict, paths: list[str], seconds: float, runs: int, eval_s: float) -> tuple[int, str] | None:
    """The most steps each of ``runs`` runs can take in ``seconds``, and the path that allows them (None: none)."""
    best = None
    for path in paths:
        fixed = run_estimate(entry, path, 0, eval_s)
        if fixed is None:
            continue
        n = int((seconds / runs - fixed) * entry[path]["steps_per_s"] / MARGIN)
        n = n // 100 * 100 if n >= 1000 else n
        if n >= 1 and (best is None or n > best[0]):
            best = (n, path)
    return best


def start_report(base: Path | None, device_name: str, dry: bool, peak: float | None) -> dict:
    """An earlier call's report on this device to add to, else a new one."""
    if base is not None and base.exists():
        old = json.loads(base.read_text())
        if old.get("format") == FORMAT and old.get("device") == device_name and old.get("dry") == dry:
            print(f"adding to {base} ({len(old['profiles'])} profiles, {len(old['runs'])} runs measured before)")
            return old
        print(f"{base} is of another layout or device: starting a new report")
    report = {"format": FORMAT, "device": device_name, "dry": dry, "peak_bf16_flops": peak, "calls": []}
    return report | {"profiles": {}, "runs": {}}


def train_and_evaluate(cfg: g.Config, world: g.World, data: g.Transitions, device: torch.device) -> dict:
    """One run end to end (fresh compilation when cfg.compile): its times, last losses and g.evaluate's metrics."""
    if cfg.compile:
        torch._dynamo.reset()
    before = compile_counters()
    result = g.train(cfg, world=world, data=data, progress=False, device=device)
    compiled = {k: v - before[k] for k, v in compile_counters().items()} if cfg.compile else {}
    t0 = time.perf_counter()
    metrics = g.evaluate(result.model, result.world, cfg)
    final = {k: result.history[k][-1] for k in ("pred_loss", "sigreg", "smooth_loss") if k in result.history}
    row = {"status": "done", "train_seconds": result.train_seconds, "eval_seconds": time.perf_counter() - t0}
    row |= {"steps_per_s": cfg.num_steps / result.train_seconds, "warnings": result.warnings, "final_losses": final}
    return row | compiled | metrics


def train_phase(phase: str, profile: str, cut: str | None, report: dict, ctx: dict) -> None:
    """A profile trained and evaluated with each objective, on the faster path, each run guarded by the time left
    and saved as soon as it ends (or is skipped, or fails)."""
    entry, left, eval_seconds = report["profiles"][profile], ctx["left"], ctx["eval_seconds"]
    paths = list(PATHS) if ctx["path"] == "auto" else [ctx["path"]]
    recipe, num_steps = g.make_config(profile), int(cut) if cut not in (None, "fit") else None
    if cut == "fit":  # one number of steps for both runs: the most that either path allows
        fit = fit_steps(entry, paths, left(), len(OBJECTIVES), max(eval_seconds, default=EVAL_ALLOWANCE_S))
        num_steps = min(fit[0], recipe.num_steps) if fit else 0
        print(f"{phase}: {f'{num_steps:,} steps fit ({fit[1]})' if fit else 'no run fits'}, {left():.0f} s left")
    world = g.build_world(recipe)  # the same world and data for both objectives, as train() would make them
    data = g.make_transitions(world, recipe.num_transitions, recipe.seq_len, recipe.data_seed)
    for objective, overrides in OBJECTIVES.items():
        cfg = shorten(g.make_config(profile, **overrides), num_steps or None)
        eval_s = max(eval_seconds, default=EVAL_ALLOWANCE_S)
        estimates = {p: run_estimate(entry, p, cfg.num_steps, eval_s) for p in paths}
        estimates = {p: s for p, s in estimates.items() if s is not None}
        path = min(estimates, key=estimates.get) if estimates else paths[0]
        cfg = dataclasses.replace(cfg, compile=path == "compiled")
        row = results.provenance(f"{phase}-{objective}", cfg, report["device"], ctx["argv"], ctx["commit"])
        row |= {"phase": phase, "profile": profile, "objective": objective, "path": path}
        row |= {"num_steps": cfg.num_steps, "recipe_num_steps": recipe.num_steps}
        row |= {"estimate_s": estimates.get(path), "estimates_s": estimates, "time_left_s": left()}
        if num_steps == 0:
            row |= {"status": "skipped", "why": f"no run fits in the {left():.0f} s left"}
        elif path not in estimates:
            row |= {"status": "skipped", "why": f"no {path} speed measured for the {profile} profile"}
        elif estimates[path] > left():
            row |= {"status": "skipped", "why": f"~{estimates[path]:.0f} s needed, {left():.0f} s left"}
        else:
            try:
                row |= train_and_evaluate(cfg, world, data, ctx["device"])
                eval_seconds.append(row["eval_seconds"])
            except Exception as err:  # recorded; the next run still goes
                row |= failure(err)
        if row["status"] == "done":
            print(
                f"{row['id']:14s} {path:8s} {cfg.num_steps:6,} steps in {row['train_seconds']:5.0f} s "
                f"(est. {row['estimate_s']:.0f} s): next-state {row['next_state_accuracy']:.3f}, "
                f"PC1+PC2 {row['pc1_plus_pc2']:.2f}, held-out R² {row['probe_r2_heldout']:.3f}, "
                f"probe plans {row['plan_success']:.1%}, latent plans {row['latent_greedy_success']:.1%}"
            )
        else:
            print(f"{row['id']:14s} {row['status']}: {row.get('why') or row.get('error', '')[:300]}")
        report["runs"][row["id"]] = row
        ctx["save"]()


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, smoke profile, a few steps: checks the script")
    parser.add_argument("--phases", default="speed,gpu,full", help="any of speed,gpu,full (comma-separated)")
    parser.add_argument("--profiles", default=None, help="the speed phase's profiles (default cpu,gpu,full; dry smoke)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 30; dry 3)")
    parser.add_argument("--gpu-steps", default=None, help="cut the gpu runs' schedule to N steps, or 'fit'")
    parser.add_argument("--full-steps", default=None, help="cut the full runs' schedule to N steps, or 'fit' (dry: 10)")
    parser.add_argument("--path", default="auto", choices=["auto", *PATHS], help="the runs' path (auto: the faster)")
    parser.add_argument("--time-limit", type=float, default=540.0, help="seconds this call may take (default 540)")
    parser.add_argument("--out", default=None, help="JSON path (default assets/gpu_benchmark.json; dry: runs/)")
    parser.add_argument("--add-to", default=None, help="an earlier call's report to add to (default: --out's)")
    parser.add_argument("--fresh", action="store_true", help="start a new report, whatever --out holds")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(phases) - {"speed", "gpu", "full"}:
        parser.error(f"unknown phases {sorted(unknown)}: expected any of speed,gpu,full")
    cuts = {"gpu": args.gpu_steps, "full": args.full_steps or ("10" if args.dry else None)}
    for phase, cut in cuts.items():
        if cut is not None and cut != "fit" and not (cut.isdigit() and int(cut) >= 1):
            parser.error(f"--{phase}-steps must be a number of steps >= 1 or 'fit', got {cut!r}")
    if args.dry:
        device, profiles = torch.device("cpu"), (args.profiles or "smoke").split(",")
        out = Path(args.out or g.REPO_ROOT / "runs" / "gpu_benchmark_dry.json")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry to check the script on the CPU")
        device, profiles = torch.device("cuda"), (args.profiles or "cpu,gpu,full").split(",")
        out = Path(args.out or lab.ASSETS / "gpu_benchmark.json")
    timed = args.steps or (3 if args.dry else 30)
    steps = {"eager": timed, "compiled": min(timed, 2) if args.dry else timed}  # dry: compiling is the cost
    name = g.describe_device(device)
    peak = peak_flops(name) if device.type == "cuda" else None
    print(f"device: {name} | torch {torch.__version__} | peak bf16 {peak / 1e12 if peak else 'unknown'} TFLOP/s")
    report = start_report(None if args.fresh else Path(args.add_to or out), name, args.dry, peak)
    command = shlex.join(["python", "bench/gpu_check.py", *argv])
    call = {"command": command, "commit": results.git_commit(), "torch": torch.__version__, "phases": phases}
    call |= {"time_limit_s": args.time_limit, "total_seconds": 0.0}
    report["calls"].append(call)
    report |= {"torch": torch.__version__, "commit": call["commit"], "command": command}

    def save():
        call["total_seconds"] = time.perf_counter() - t_start
        results.write_json(out, report)

    left = lambda: args.time_limit - (time.perf_counter() - t_start)
    done_evals = [r["eval_seconds"] for r in report["runs"].values() if r.get("status") == "done"]
    ctx = {"left": left, "eval_seconds": done_evals, "path": args.path, "device": device, "save": save}
    ctx |= {"argv": ["bench/gpu_check.py", *argv], "commit": call["commit"]}
    for profile in profiles if "speed" in phases else []:
        report["profiles"][profile] = speed(profile, device, steps, peak, left)
        save()
    for phase in [p for p in ("gpu", "full") if p in phases]:
        profile = "smoke" if args.dry else phase
        if profile not in report["profiles"]:  # its speed chooses the path and guards the time
            report["profiles"][profile] = speed(profile, device, steps, peak, left)
            save()
        train_phase(phase, profile, cuts[phase], report, ctx)
    save()
    print(f"wrote {out} ({call['total_seconds']:.0f} s in this call)")
    return report


if __name__ == "__main__":
    main()
