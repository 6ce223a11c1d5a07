"""Print GridJEPA's speed figures: data generation, rendering, training throughput (also against a plain-PyTorch
baseline of the same recipe, bench/baseline.py, and eager against torch.compile), planning.

    python bench/benchmark.py            # everything, on the CPU and on the GPU when there is one
    python bench/benchmark.py --quick    # fewer repetitions
    python bench/benchmark.py --only against_baseline compile   # some parts, merged into --out's other parts

Figures, not tests: nothing here asserts a time. Results are also written to assets/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import baseline  # noqa: E402
import lab  # noqa: E402

import gridjepa_utils as g  # noqa: E402


def timed(fn, repeat: int = 3, sync: bool = False) -> float:
    """Best wall time of ``repeat`` calls, in seconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_data(devices: list[torch.device], repeat: int) -> dict:
    world = g.World(5)
    out = {}
    seconds = timed(lambda: g.make_transitions(world, 50_000, seed=0), repeat)
    data = g.make_transitions(world, 50_000, seed=0)
    out["generate_50k_s"] = seconds
    out["transitions_per_s"] = 50_000 / seconds
    out["stored_MB"] = data.nbytes / 1e6
    out["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"data: 50,000 transitions in {seconds * 1e3:.0f} ms ({50_000 / seconds:,.0f}/s), "
        f"stored in {data.nbytes / 1e6:.2f} MB; "
        f"process peak RSS {out['peak_rss_MB']:.0f} MB"
    )
    for device in devices:
        idx = torch.randint(len(data), (4096,))
        sync = device.type == "cuda"
        s = timed(lambda: g.sample_batch(world, data, idx, device), repeat, sync)
        out[f"render_images_per_s_{device.type}"] = 2 * len(idx) / s
        print(f"render on {device.type}: {2 * len(idx) / s:,.0f} images/s (batches of {len(idx)} transitions)")
    family = g.WorldFamily(g.procedural_layouts(5, 5000))  # a fresh layout per trajectory: no atlas to gather from
    family_data = g.make_transitions(family, 5000, seed=0)
    for device in devices:
        idx, sync = torch.randint(len(family_data), (256,)), device.type == "cuda"
        on_demand = timed(lambda: g.sample_batch(family, family_data, idx, device), repeat, sync)
        t0 = time.perf_counter()
        painted = g.paint_frames(family, family_data, device)
        paint_s = time.perf_counter() - t0
        gather = timed(lambda: g.sample_batch(family, family_data, idx, device, painted), repeat, sync)
        size = g.make_config("layouts").input_size  # what training gathers: frames pooled to the encoder's input
        pooled = g.paint_frames(family, family_data, device, size=size)
        gather_pooled = timed(lambda: g.sample_batch(family, family_data, idx, device, pooled), repeat, sync)
        out[f"family_painted_on_demand_images_per_s_{device.type}"] = 2 * len(idx) / on_demand
        out[f"family_gathered_images_per_s_{device.type}"] = 2 * len(idx) / gather
        out[f"family_gathered_pooled_images_per_s_{device.type}"] = 2 * len(idx) / gather_pooled
        print(
            f"5,000 layouts on {device.type}: painted on demand {2 * len(idx) / on_demand:,.0f} images/s, gathered "
            f"from frames painted once {2 * len(idx) / gather:,.0f} images/s, pooled to {size}x{size} "
            f"{2 * len(idx) / gather_pooled:,.0f} images/s (painting its {len(painted[1]):,} frames took "
            f"{paint_s:.1f} s)"
        )
    return out


def bench_training(devices: list[torch.device], steps: int) -> dict:
    out = {}
    for device in devices:
        for profile in ["smoke", "cpu", "full"]:
            cfg = g.make_config(
                profile, num_steps=steps + 2, log_every=10**9, eval_every=10**9, ckpt_every=10**9, warmup_steps=1
            )
            world = g.World(cfg.grid_size)
            data = g.make_transitions(world, 4096, cfg.seq_len, 0)
            g.train(
                g.make_config(profile, num_steps=2, log_every=10**9, eval_every=10**9),
                world,
                data,
                progress=False,
                device=device,
            )
            res = g.train(cfg, world, data, progress=False, device=device)
            # the loop also does two end-of-run evaluations; that is part of what a user waits for
            sps = cfg.num_steps / res.train_seconds
            imgs = sps * cfg.batch_size * cfg.seq_len
            row = {"steps_per_s": sps, "images_per_s": imgs, "params": g.count_parameters(res.model)}
            if device.type == "cuda":
                flops_per_img = (
                    3 * 2 * g.count_parameters(res.model.encoder) * (1 + (cfg.input_size // cfg.patch_size) ** 2)
                )
                peak = 989e12 if "H100" in torch.cuda.get_device_name() else 312e12  # dense bf16 peak
                row["mfu"] = imgs * flops_per_img / peak
                if profile == "full":
                    row["full_recipe_minutes"] = g.make_config("full").num_steps / sps / 60
            out[f"{profile}_{device.type}"] = row
            extra = f", MFU {row['mfu']:.1%}" if "mfu" in row else ""
            extra += f", full recipe ~{row['full_recipe_minutes']:.0f} min" if "full_recipe_minutes" in row else ""
            print(
                f"train {profile:5s} on {device.type}: {sps:6.2f} steps/s, {imgs:8,.0f} images/s "
                f"({row['params'] / 1e6:.2f}M params, batch {cfg.batch_size}x{cfg.seq_len}){extra}"
            )
    return out


def bench_baseline(devices: list[torch.device], steps: int) -> dict:
    """The `cpu` profile's training against bench/baseline.py, the same recipe in plain PyTorch, in this process:
    steps/s of train() with its logging, evaluations and checkpoints as the main job takes them, and with them off."""
    out = {}
    world = g.World(5)
    data = g.make_transitions(world, 50_000, 2, 0)
    for device in devices:
        g.train(g.make_config("cpu", num_steps=2), world, data, progress=False, device=device)  # warm-up
        job_cfg = g.make_config("cpu", num_steps=steps)  # the profile's own log, evaluation and checkpoint cadence
        bare_cfg = g.make_config("cpu", num_steps=steps, log_every=10**9, eval_every=10**9, ckpt_every=10**9)
        base = bare = job = 0.0
        for _ in range(2):  # taken in turn, the best of two each: a busy machine slows one run, not a whole kind
            base = max(base, baseline.steps_per_second(steps, device))
            with tempfile.TemporaryDirectory() as tmp:  # the main job writes a checkpoint every ckpt_every steps
                res = g.train(job_cfg, world, data, Path(tmp) / "b.pt", progress=False, device=device)
            job = max(job, steps / res.train_seconds)
            bare = max(bare, steps / g.train(bare_cfg, world, data, progress=False, device=device).train_seconds)
        row = {"baseline_steps_per_s": base, "steps": steps}
        row["train_steps_per_s"] = bare  # still one evaluation: the last step's
        row["main_job_steps_per_s"] = job
        row["train_over_baseline"] = row["train_steps_per_s"] / base
        row["main_job_over_baseline"] = row["main_job_steps_per_s"] / base
        out[f"cpu_profile_{device.type}"] = row
        print(
            f"cpu profile on {device.type}, {steps} steps: plain-PyTorch baseline {base:.2f} steps/s; train() "
            f"{row['train_steps_per_s']:.2f} steps/s = {row['train_over_baseline']:.2f}x the baseline, with the main "
            f"job's logs, evaluations and checkpoints {row['main_job_steps_per_s']:.2f} steps/s = "
            f"{row['main_job_over_baseline']:.2f}x"
        )
    return out


def bench_compile(devices: list[torch.device], steps: int) -> dict:
    """One training step of the `cpu` profile's model (train_step: loss, backward, clipping, AdamW) eager against the
    model under torch.compile (inductor; on a GPU also mode="reduce-overhead"); the compiling is timed apart."""
    out = {}
    cfg = g.make_config("cpu")
    world = g.World(cfg.grid_size)
    data = g.make_transitions(world, 50_000, cfg.seq_len, 0)
    for device in devices:
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

        def run(mode: str | None):
            """(seconds of the first 3 steps, steps/s after them) for the model eager (mode "eager") or compiled."""
            torch.manual_seed(cfg.seed)
            model = g.JEPA(cfg, world.image_size).to(device)
            sigreg, opt = g.SIGReg(cfg.sigreg_dirs, seed=cfg.seed).to(device), g.make_optimizer(model, cfg)
            net = model if mode == "eager" else torch.compile(model, mode=mode)
            batches = [
                g.sample_batch(world, data, torch.randint(len(data), (cfg.batch_size,), generator=gen), device)
                for gen in (torch.Generator().manual_seed(k) for k in range(steps + 3))
            ]
            times = []
            for k, (obs, actions) in enumerate(batches):
                sync()
                t0 = time.perf_counter()
                g.train_step(net, sigreg, opt, obs, actions, cfg, k, measure=False)
                sync()
                times.append(time.perf_counter() - t0)
            return sum(times[:3]), steps / sum(times[3:])

        first, eager = run("eager")
        row = {"eager_steps_per_s": eager, "steps": steps}
        print(f"train step on {device.type}: eager {eager:.2f} steps/s")
        for mode in [None] + (["reduce-overhead"] if device.type == "cuda" else []):
            name = f"compile_{mode or 'default'}"
            try:
                first, sps = run(mode)
            except Exception as e:  # a failure is a figure too: say what failed
                row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                print(f"  torch.compile(mode={mode!r}) failed: {row[name]['error']}")
                continue
            row[name] = {"steps_per_s": sps, "over_eager": sps / eager, "first_3_steps_s": first}
            print(
                f"  torch.compile(mode={mode!r}): {sps:.2f} steps/s = {sps / eager:.2f}x eager "
                f"(compiling: the first 3 steps took {first:.1f} s)"
            )
        out[f"cpu_profile_{device.type}"] = row
    return out


def bench_planning(repeat: int) -> dict:
    """Time per plan for each planner and grid size (untrained cpu-profile models: time does not depend on weights)."""
    out = {}
    for size in [5, 8, 12]:
        cfg = g.make_config("cpu", grid_size=size)
        world = g.World(size)
        model = g.untrained_model(cfg, world)
        starts, goals = world.all_pairs()
        gen = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(starts), generator=gen)[:600]
        starts, goals = starts[pick], goals[pick]
        emb = g.encode_states(model, world).numpy()
        probe = g.fit_probe(emb, world.cell_pos(world.free_cells))
        planners = {
            "probe": g.probe_policy(model, world, probe),
            "nearest": lab.nearest_cell_policy(model, world),
            "cem": g.cem_policy(model, world),
            "search": g.exhaustive_policy(model, world),
            "graph": g.graph_policy(model, world),
        }
        for name, policy in planners.items():
            s = timed(lambda: policy(starts, goals), repeat)  # one MPC decision for 600 pairs at once
            out[f"{name}_{size}"] = {"ms_per_decision_600_pairs": s * 1e3, "ms_per_plan": s * 1e3 / len(starts)}
            print(
                f"plan {name:7s} grid {size:2d}: one decision for {len(starts)} pairs in {s * 1e3:7.1f} ms "
                f"= {s * 1e3 / len(starts):.3f} ms per plan"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(g.REPO_ROOT / "assets" / "benchmark.json"))
    parts = ["data", "training", "against_baseline", "compile", "planning"]
    parser.add_argument("--only", nargs="+", choices=parts, default=parts, help="the parts to run (default: all)")
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    repeat = 2 if args.quick else 5
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
    )
    runs = {
        "data": lambda: bench_data(devices, repeat),
        "training": lambda: bench_training(devices, 10 if args.quick else 30),
        "against_baseline": lambda: bench_baseline(devices, 100 if args.quick else 450),
        "compile": lambda: bench_compile(devices, 20 if args.quick else 50),
        "planning": lambda: bench_planning(repeat),
    }
    out = Path(args.out)
    results = json.loads(out.read_text()) if set(args.only) != set(parts) and out.exists() else {}
    results |= {"device": g.describe_device(devices[-1])} | {k: run() for k, run in runs.items() if k in args.only}
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
