"""Print GridJEPA's speed figures: data generation, rendering, training throughput, planning.

    python bench/benchmark.py            # everything, on the CPU and on the GPU when there is one
    python bench/benchmark.py --quick    # fewer repetitions

Figures, not tests: nothing here asserts a time. Results are also written to assets/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
            f"{2 * len(idx) / gather_pooled:,.0f} images/s (painting its {len(painted.frames):,} frames took "
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
            "nearest": g.nearest_cell_policy(model, world),
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
    parser.add_argument("--out", default=str(g.ASSETS / "benchmark.json"))
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    repeat = 2 if args.quick else 5
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
    )
    results = {
        "device": g.describe_device(devices[-1]),
        "data": bench_data(devices, repeat),
        "training": bench_training(devices, 10 if args.quick else 30),
        "planning": bench_planning(repeat),
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
