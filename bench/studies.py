"""Studies too long for CI; their rows are saved in assets/ by bench/results.py and reported in RESULTS.md.

    python bench/studies.py probes    # what moves held-out-cell probe R^2 (notebook 04) -> assets/probe_study.json
    python bench/studies.py scaling   # grids 5, 8, 12: time to 99% next-state accuracy (05) -> assets/scaling.json
    python bench/studies.py geometry --seeds 0 1 2 3 4   # what makes the latent a map (04) -> geometry_study.json
    python bench/studies.py layouts-geometry --seeds 0 1 2  # the map recipe on obstacle layouts -> layouts_geometry
    python bench/studies.py layouts --sizes 5 8   # worlds never seen: 20 ... unlimited training layouts (05)
    python bench/studies.py imagine-tuning  # imagination search's settings, on validation layouts (05)
    python bench/studies.py imagine-maps --seeds 0 1 2  # what the search imagines, against the true layouts (05)
    python bench/studies.py recipe-tuning   # the cpu recipe's schedule, on validation layouts (05)
    python bench/studies.py readers   # 8x8: which encoder reads walls best for equal CPU time (05)
    python bench/studies.py long-runs  # 8x8: the readers' training curves run long, from runs/ -> long_runs.json
    python bench/studies.py transition-errors --sizes 8 --steps 20000  # what a layouts model gets wrong (05)
    python bench/studies.py budget --sizes 8 --steps 20000 --seeds 0 1  # steps the agent needs, 3x the budget (05)
    python bench/studies.py writeup-size   # the original write-up's architecture (full) on this CPU, both objectives
    python bench/studies.py ensemble --sizes 8 --steps 20000 --seeds 0 1  # two layouts models planning as one
    python bench/studies.py wall-data --seeds 0  # 8x8: the layouts recipe on data whose starts favour walls
    python bench/studies.py transition-errors --only "64x64 input, patch 8, 1 block (the earlier 8x8 recipe)" ...
                                      # the same for the readers study's models

Each row trains with the project's own code on this machine's CPU and is saved with its id, full config, device,
commit and command; a row measured again (the same id) replaces it. --out-dir writes elsewhere (e.g. a smoke check).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import results  # noqa: E402

import gridjepa_utils as g  # noqa: E402


class _Lab:
    """What only the studies use: from bench/lab.py where it has moved there, else from the module."""

    def __getattr__(self, name):
        try:
            import lab
        except ImportError:
            return getattr(g, name)
        return getattr(lab, name) if hasattr(lab, name) else getattr(g, name)


L = _Lab()

PROBE_BASE = {"num_steps": 300, "smooth_weight": 0.0}  # the probe rows' shared overrides of the cpu profile

PROBE_ROWS = {  # name -> overrides of the cpu profile: 300 steps and no smoothness term (the original write-up's
    # objective), as the cpu profile was when these rows were first measured
    "cpu profile (lam 0.1, D 192)": PROBE_BASE,
    "lam 1": {**PROBE_BASE, "lam": 1.0},
    "lam 10": {**PROBE_BASE, "lam": 10.0},
    "latent dim 16": {**PROBE_BASE, "latent_dim": 16},
    "obstacles (two_rooms)": {**PROBE_BASE, "layout": "two_rooms"},
    "data 5k transitions": {**PROBE_BASE, "num_transitions": 5_000},
    "encoder input 64x64": {**PROBE_BASE, "input_size": 64},
    "3x the steps (900)": {**PROBE_BASE, "num_steps": 900},
}


GEOMETRY_ROWS = {  # name -> overrides of the cpu profile (whose default is the map recipe)
    "write-up objective (w 0)": {"num_steps": 300, "smooth_weight": 0.0},
    "w 1": {"num_steps": 300, "smooth_weight": 1.0},
    "w 3": {"num_steps": 300, "smooth_weight": 3.0},
    "w 5, 300 steps (the earlier recipe)": {"num_steps": 300},
    "w 5, 450 steps (the recipe)": {},
    "w 5 without the ramp": {"num_steps": 300, "smooth_ramp": 0.0},
    "w 5 ramped over all of training": {"num_steps": 300, "smooth_ramp": 1.0},
    "w 10": {"num_steps": 300, "smooth_weight": 10.0},
    "w 0, lam 10": {"num_steps": 300, "smooth_weight": 0.0, "lam": 10.0},
}


# imagination search's settings, as the rows were planned (older rows: rule "radius", merge 0.4 or 0.5, meet "both")
IMAGINE_SETTINGS = L.imagination_settings()
OLD_RULES = ("undo", "radius")  # bump rules since removed from the module: a row planned with one says so in its id
DEVICE = g.describe_device(torch.device("cpu"))


def model_tag(row: dict) -> str:
    """A layouts model in a row id: grid, profile (layouts_gpu: "-gpu"), steps, overrides, seed."""
    over = results.slug(row.get("overrides") or {}, empty="")
    profile = row.get("profile", "layouts")
    profile = "" if profile == "layouts" else "-" + profile.removeprefix("layouts_").replace("_", "-")
    return (
        f"g{row.get('grid_size', 5)}{profile}-steps{row['num_steps']}"
        + (f"-{over}" if over else "")
        + (f"-s{row['seed']}")
    )


def split_fields(record: dict | None, metrics: dict | None = None) -> dict:
    """A layouts model's row on the held-out layouts as drawn now, new up to symmetry (no training layout is one of
    them turned or mirrored): {"heldout_split": "symmetry"}, which row_id marks "-sym" so the rows scored on the old
    held-out set (it held turned and mirrored training layouts) stay beside them. ``metrics``: the figures a shipped
    run's record gave (None: scored now); without the planner table (heldout_bfs_success) they are the old set's: {}.
    A shipped model whose training run predates the planner table trained on the old split: "trained_before_split"."""
    if metrics is not None and "heldout_bfs_success" not in metrics:
        return {}
    before = record is not None and "heldout_bfs_success" not in record["metrics"]
    return {"heldout_split": "symmetry"} | ({"trained_before_split": True} if before else {})


def row_id(study: str, row: dict) -> str:
    """A row's id in its study's file, from the fields that tell it apart (its study, grid size, layouts, seed,
    overrides, held-out split); the same run measured again gets the same id and replaces the row."""
    rule = row.get("imagine_rule", row.get("rule"))
    sym = "-sym" if row.get("heldout_split") == "symmetry" else ""  # held-out layouts new up to symmetry
    old = f"-{rule}" if rule in OLD_RULES and study != "imagine-tuning" else ""
    over, seed = results.slug(row.get("overrides") or {}), row.get("seed")
    if study in ("probes", "geometry", "layouts-geometry"):
        layout = row.get("layout", "open").replace("_", "-")
        where = f"-{layout}" if study == "layouts-geometry" else ""
        return f"{study}{where}-{over}-s{seed}"
    if study == "writeup-size":
        return f"writeup-size-{row['profile']}-{over}-s{seed}"
    if study == "scaling":
        layout = "open" if row["layout"] == "open" else "walls10"
        return (
            f"scaling-g{row['grid_size']}-{layout}-steps{row['num_steps']}-w{row['smooth_weight']:g}"
            f"-ramp{row['smooth_ramp']:g}{old}"
        )
    if study == "layouts":
        tag = model_tag(row).replace(f"g{row['grid_size']}", f"g{row['grid_size']}-n{row['layouts']}", 1)
        return f"layouts-{tag}{old}{sym}"
    if study == "budget":
        return f"budget-{model_tag(row)}{old}{sym}"
    if study == "imagine-maps":
        return f"imagine-maps-{model_tag(row)}-{row['layouts'].replace('-', '')}{old}{sym}"
    if study == "transition-errors":
        return f"transition-errors{'-readers' if 'readers_row' in row else ''}-{model_tag(row)}{sym}"
    if study == "readers":
        return f"readers-g8-{over}-budget{row['budget_seconds']:g}-s{seed}"
    if study == "wall-data":
        return f"wall-data-g{row['grid_size']}-bias{row['wall_bias']:g}-steps{row['num_steps']}-s{seed}{sym}"
    if study == "ensemble":
        members = "+".join(f"s{s}" for s in row["members"])
        return f"ensemble-g{row['grid_size']}-steps{row['num_steps']}-{members}-{row['combine']}-{row['layouts']}{sym}"
    if study == "long-runs":
        return f"long-runs-g8-{over}-steps{row['num_steps']}-s{seed}"
    if study == "recipe-tuning":
        return f"recipe-tuning-{over}-v{row['validation_layout']}-s{seed}{old}"
    if study == "imagine-tuning":
        model = "".join(c for c in row["model"].lower() if c not in "()").replace(" ", "-").replace("_", "-")
        return f"imagine-tuning-{model}-{row['rule']}-merge{row['merge']:g}-{row['meet']}"
    raise ValueError(f"unknown study {study!r}")


def stamp(study: str, row: dict, cfg: g.Config, device: str = DEVICE) -> dict:
    """A measured row with its provenance first: id, the full Config it trained with, device, commit, command."""
    return results.provenance(row_id(study, row), cfg, device) | row


def plan_summary(world, policy, remember_bumps: bool = False) -> dict:
    """Success and optimal share over every ordered pair of free cells, and ms per batched MPC decision."""
    result = g.run_mpc(world, policy, remember_bumps=remember_bumps)
    decisions = max(1, int(result.steps.clamp(max=result.paths.shape[1] - 1).max()))
    return {
        "success": float(result.success.float().mean()),
        "optimal": float(result.optimal.float().mean()),
        "ms_per_decision": 1e3 * result.seconds / decisions,
    }


def geometry_row(cfg, with_untrained: bool, planners=("probe", "latent", "cem")) -> dict:
    """Train cfg, then everything the latent-map question asks of it."""
    run = g.train(cfg, progress=False)
    model, world = run.model, run.world
    row = {
        "train_seconds": run.train_seconds,
        "next_state_accuracy": g.next_state_accuracy(model, world),
        **g.geometry_report(model, world),
        "plans": {name: plan_summary(world, g.make_policy(name, model, world)) for name in planners},
    }
    if "imagine" in planners:
        row |= IMAGINE_SETTINGS
        memory = plan_summary(world, g.imagination_policy(model, world), remember_bumps=True)
        row["plans"]["imagine (remembers bumps)"] = memory
    row["plans"]["bfs (optimum)"] = plan_summary(world, g.bfs_policy(world))
    if with_untrained:  # the control row: LeWM's own cost, and the untrained encoder
        row["plans"]["cem (final-step L2)"] = plan_summary(world, g.cem_policy(model, world, cost="final"))
        row["untrained"] = g.geometry_report(g.untrained_model(cfg, world), world)
    return row


WRITEUP_SIZE_SCHEDULE = dict(num_steps=2000, batch_size=64, warmup_steps=100, log_every=10, eval_every=250)
WRITEUP_SIZE_ROWS = {  # name -> (profile, overrides): the full model on a schedule that fits a CPU, the cpu beside it
    "cpu, series recipe (lam 0.1, w 5)": ("cpu", {}),
    "cpu, write-up objective (lam 10, w 0)": ("cpu", dict(lam=10.0, smooth_weight=0.0)),
    "full, series recipe (lam 0.1, w 5)": ("full", WRITEUP_SIZE_SCHEDULE | dict(ckpt_every=250)),
    "full, write-up objective (lam 10, w 0)": (
        "full",
        WRITEUP_SIZE_SCHEDULE | dict(ckpt_every=250, lam=10.0, smooth_weight=0.0),
    ),
}


def writeup_size_study(seeds: list[int], only: list[str] | None = None, save=None) -> list[dict]:
    """Does the map hold at the original write-up's size? Its architecture (128x128 input, 4 blocks of width 192)
    trained on a shortened schedule with both objectives, the cpu model with each beside it; same evaluation."""
    rows = []
    for name in [n for n in WRITEUP_SIZE_ROWS if not only or n in only]:
        profile, over = WRITEUP_SIZE_ROWS[name]
        for seed in seeds:
            cfg = g.make_config(profile, seed=seed, **over)
            row = {"row": name, "profile": profile, "seed": seed, "overrides": over}
            row = stamp("writeup-size", row | geometry_row(cfg, True), cfg)
            rows.append(row)
            if save is not None:
                save([row])
            p = row["plans"]
            print(
                f"{name:40s} seed {seed}: next {row['next_state_accuracy']:.3f} probe {p['probe']['success']:.3f}"
                f"/{p['probe']['optimal']:.3f} latent {p['latent']['success']:.3f}/{p['latent']['optimal']:.3f}"
                f" | PC1+2 {row['pc1'] + row['pc2']:.0%} held-out R2 {row['probe_r2_heldout']:.3f}"
                f" (untrained {row['untrained']['probe_r2_heldout']:.3f}) std {row['latent_std']:.2f}"
                f" | {row['train_seconds']:.0f} s",
                flush=True,
            )
    return rows


def geometry_study(seeds: list[int], only: list[str] | None = None, layouts=("open",), save=None) -> list[dict]:
    """Each lever against the unchanged write-up objective, per seed; the untrained encoder beside the control.
    On obstacle layouts: the control and the recipe, with every planner."""
    rows = []
    for layout in layouts:
        names = (
            list(GEOMETRY_ROWS)
            if layout == "open"
            else [
                "write-up objective (w 0)",
                "w 3",
                "w 5, 300 steps (the earlier recipe)",
                "w 5, 450 steps (the recipe)",
                "w 5 ramped over all of training",
            ]
        )
        planners = (
            ("probe", "latent", "cem", "imagine")
            if layout == "open"
            else ("probe", "latent", "cem", "search", "imagine", "graph")
        )
        for name in [n for n in names if not only or n in only]:
            for seed in seeds:
                cfg = g.make_config("cpu", seed=seed, layout=layout, **GEOMETRY_ROWS[name])
                row = {"row": name, "layout": layout, "seed": seed, "overrides": GEOMETRY_ROWS[name]}
                row |= geometry_row(cfg, name.startswith("write-up"), planners)
                row = stamp("geometry" if layout == "open" else "layouts-geometry", row, cfg)
                rows.append(row)
                if save is not None:
                    save([row])  # a long study: each row is on disk as soon as it is done
                p = row["plans"]
                print(
                    f"{layout:9s} {name:26s} seed {seed}: PC1+2 {row['pc1'] + row['pc2']:.0%}"
                    f"  rho {row['spearman_l2_grid']:.2f}  held-out R2 {row['probe_r2_heldout']:.3f}"
                    f"  std {row['latent_std']:.2f} rank {row['effective_rank']:.0f}"
                    f" | next {row['next_state_accuracy']:.2f} probe {p['probe']['success']:.3f}"
                    f" latent {p['latent']['success']:.3f}/{p['latent']['optimal']:.3f}"
                    f" cem {p['cem']['success']:.3f}/{p['cem']['optimal']:.3f}"
                    f" ({p['cem']['ms_per_decision']:.0f} ms)"
                    + (f" search {p['search']['success']:.3f}" if "search" in p else "")
                    + (
                        f" imagine {p['imagine']['success']:.3f}"
                        f" (remembering bumps {p['imagine (remembers bumps)']['success']:.3f})"
                        if "imagine" in p
                        else ""
                    )
                    + (f" graph {p['graph']['success']:.3f}" if "graph" in p else "")
                    + f" | {row['train_seconds']:.0f} s",
                    flush=True,
                )
    return rows


def probe_study(seeds: list[int], only: list[str] | None = None, save=None) -> list[dict]:
    """Held-out-cell probe R^2 (plain and ridge, 20 splits) with the untrained baseline, and planning, per row."""
    rows = []
    for name, overrides in PROBE_ROWS.items():
        if only and name not in only:
            continue
        for seed in seeds:
            cfg = g.make_config("cpu", seed=seed, **overrides)
            run = g.train(cfg, progress=False)
            world = run.world
            pos = world.cell_pos(world.free_cells)
            trained = g.probe_report(g.encode_states(run.model, world).numpy(), pos)
            untrained = g.probe_report(g.encode_states(g.untrained_model(cfg, world), world).numpy(), pos)
            plan = g.run_mpc(world, g.make_policy("probe", run.model, world)).summary()
            row = {
                "row": name,
                "seed": seed,
                "overrides": overrides,
                "train_seconds": run.train_seconds,
                "next_state_accuracy": g.next_state_accuracy(run.model, world),
                "plan_success": plan["success"],
                "trained": trained,
                "untrained": untrained,
            }
            row = stamp("probes", row, cfg)
            rows.append(row)
            if save is not None:
                save([row])
            print(
                f"{name:30s} seed {seed}: held-out R2 plain {trained['heldout_mean']:6.2f}"
                f" ± {trained['heldout_std']:.2f}"
                f"  ridge {trained['ridge_heldout_mean']:6.2f}  | untrained plain {untrained['heldout_mean']:6.2f}"
                f"  ridge {untrained['ridge_heldout_mean']:6.2f} | plan {plan['success']:.1%}"
                f" | {run.train_seconds:.0f} s",
                flush=True,
            )
    return rows


SCALING_STEPS = {5: 450, 8: 600, 12: 1200, 16: 1500}
SCALING_LAYOUTS = ("open", "walls 10%")


def scaling_study(
    sizes: list[int],
    pairs: int = 600,
    steps: int | None = None,
    layouts=SCALING_LAYOUTS,
    smooth: float | None = None,
    ramp: float | None = None,
    save=None,
) -> list[dict]:
    """The cpu recipe (latent-map term on) on G x G grids, open and with 10% random walls (a seeded connected
    layout): steps to 99% next-state accuracy (checked every 25 steps), the latent's geometry, and planning on up
    to ``pairs`` random start->goal pairs with the latent cost (greedy, CEM), imagination search (goal image and
    model only) beside the privileged imagined graph, the greedy probe, random and BFS.
    ``steps`` overrides the per-size schedule (SCALING_STEPS), ``smooth`` the recipe's smoothness weight (0: the
    original write-up's objective), ``ramp`` the share of training it ramps in over."""
    rows = []
    for size in sizes:
        for layout in layouts:
            walls = None if layout == "open" else L.random_layout(size, 0.1, seed=size)
            num_steps = steps or SCALING_STEPS.get(size, 1500)
            input_size = 32 if size <= 5 else 64
            over = {} if smooth is None else {"smooth_weight": smooth}
            over |= {} if ramp is None else {"smooth_ramp": ramp}
            cfg = g.make_config(
                "cpu", grid_size=size, input_size=input_size, num_steps=num_steps, eval_every=25, **over
            )
            world = g.World(size, walls=walls)
            run = g.train(cfg, world=world, progress=False)
            evals = list(zip(run.history["eval_step"], run.history["next_state_acc"]))
            reached = next((s for s, acc in evals if acc >= 0.99), None)
            starts, goals = world.all_pairs()
            pick = torch.randperm(len(starts), generator=torch.Generator().manual_seed(0))[:pairs]
            planners = {  # makers, so the timed first decision starts from a fresh planner (no kept searches)
                "latent greedy": lambda: g.latent_greedy_policy(run.model, world),
                "cem": lambda: g.cem_policy(run.model, world),
                "imagine": lambda: g.imagination_policy(run.model, world),
                "graph (privileged)": lambda: g.graph_policy(run.model, world),
                "probe": lambda: g.make_policy("probe", run.model, world),
                "random": lambda: g.random_policy(0),
                "bfs": lambda: g.bfs_policy(world),
            }
            plans = {}
            for name, make in planners.items():
                plan = g.run_mpc(world, make(), starts[pick], goals[pick])
                policy = make()
                t0 = time.perf_counter()
                policy(starts[pick], goals[pick])
                plans[name] = plan.summary() | {"ms_per_decision_all_pairs": 1e3 * (time.perf_counter() - t0)}
                if name == "imagine":  # the same agent, remembering its own wall bumps (same decision time)
                    memory = g.run_mpc(world, make(), starts[pick], goals[pick], remember_bumps=True)
                    plans["imagine (remembers bumps)"] = memory.summary()
            row = {
                "grid_size": size,
                "layout": layout,
                "walls": int(world.walls.sum()),
                "input_size": input_size,
                "num_steps": num_steps,
                "smooth_weight": cfg.smooth_weight,
                "smooth_ramp": cfg.smooth_ramp,
                "train_seconds": run.train_seconds,
                "steps_to_99": reached,
                "seconds_to_99": None if reached is None else reached * run.train_seconds / num_steps,
                "final_next_state_accuracy": evals[-1][1],
                **g.geometry_report(run.model, world, num_splits=5),
                "plan_pairs": len(pick),
                **IMAGINE_SETTINGS,
                "plans": plans,
            }
            row = stamp("scaling", row, cfg)
            rows.append(row)
            if save is not None:
                save([row])
            print(
                f"grid {size:2d} {layout:9s}: next-state {evals[-1][1]:.3f} (99% at {reached}), "
                f"PC1+2 {row['pc1'] + row['pc2']:.0%}, rho {row['spearman_l2_grid']:.2f} | "
                + " ".join(f"{n} {p['success']:.1%}" for n, p in plans.items())
                + f" | {run.train_seconds:.0f} s",
                flush=True,
            )
    return rows


LAYOUT_COUNTS = ("20", "200", "2000", "unlimited")
UNLIMITED_LAYOUTS = 50_000  # "unlimited": one layout per training trajectory of the layouts profile
# 8x8: cells too small to read at 32x32; in 5-7 min of CPU 4 patches of 32x32 get 0.74-0.77 of the validation
# transitions right, 16 patches of 16x16 0.71-0.73, 64 patches of 8x8 0.26-0.29 (seeds 0 and 1; python
# bench/studies.py readers). Over a long run 16 patches go further: 0.81 at step 10,000 of 20,000 on the training
# curve, 4 patches 0.71, flat since step 3,000 (long_runs.json). Then the tokens' places: cropped
# to the board's rows (8 patches) and flattened rather than pooled by the CLS token (pool="flat"), the training
# curve stands at 0.905 at step 10,000 of 12,000 (validation layouts: 0.889), where 16 CLS-pooled patches stood at
# 0.81 of 20,000 and ended at 0.84. Then the data: that model gets 0.954 of the transitions it trained on right and
# 0.886 of the others of the same layouts, so it learns some transitions by heart. 250,000 training transitions (five
# per layout) in place of 50,000 take the curve to 0.944 and validation to 0.946 over the same 12,000 steps; over
# 20,000 steps held-out planning stops 1.5 / 0.3 points short of 90% (seeds 0 / 1). 500,000 transitions (ten per
# layout) over 20,000 steps: 92.2% / 91.5% / 91.3% (seeds 0 / 1 / 2). Their 1,000,000 frames, stored cropped to the
# rows the encoder reads, take ~8 GiB: above the default memory limit they are painted batch by batch instead (the
# same images, slower); GRIDJEPA_MEMORY_LIMIT_GB=12 paints them once
LAYOUTS_SIZE_OVERRIDES = {
    8: {"input_size": 64, "patch_size": 16, "crop": True, "pool": "flat", "num_transitions": 500_000}
}


def size_overrides(size: int, over: dict | None = None) -> dict:
    """The Config fields a grid size's layouts recipe changes: ``over``, or when None its LAYOUTS_SIZE_OVERRIDES."""
    return LAYOUTS_SIZE_OVERRIDES.get(size, {}) if over is None else over


def layouts_config(
    profile: str, size: int, seed: int, steps: int | None = None, num_layouts=UNLIMITED_LAYOUTS, over=None
):
    """The layouts recipe's config for a grid size (with size_overrides), ``steps`` None: the profile's."""
    more = {} if steps is None else {"num_steps": steps}
    over = size_overrides(size, over)
    return g.make_config(profile, grid_size=size, seed=seed, num_layouts=num_layouts, **over, **more)


def shipped_layouts_runs() -> dict:
    """The shipped runs (python gridjepa_utils.py --layouts procedural, on a CPU and on a GPU): config hash ->
    (checkpoint, run record)."""
    shipped = {}
    for path in (L.ASSETS / "gridjepa_layouts.pt", L.ASSETS / "gridjepa_layouts_gpu.pt"):
        if path.exists():
            _, shipped_cfg, shipped_record = g.load_run(path)
            shipped[L.config_hash(shipped_cfg)] = (path, shipped_record)
    return shipped


def layouts_run(cfg: g.Config, shipped: dict):
    """A layouts model for cfg: the shipped run when cfg is its config, else runs/ under the CLI's name - reused when
    finished, trained (or resumed) otherwise. Returns the run and the shipped run record (None if not shipped)."""
    path, record = shipped.get(L.config_hash(cfg), (None, None))
    return g.train(cfg, ckpt_path=path or g.default_out_path(cfg), progress=False), record


def layouts_study(
    sizes: list[int], seeds: list[int], counts=LAYOUT_COUNTS, save=None, profile="layouts", steps=None, over=None
) -> list[dict]:
    """Worlds never seen: train the `layouts` profile on K procedurally generated layouts (K = 20 ... unlimited),
    then measure (L.evaluate_unseen) next-state accuracy and planning on the 200 held-out layouts (10 seeded pairs
    each: 2,000 pairs) and on the four named 5x5 layouts, with the agent-only planner (imagine) beside the
    privileged graph planner, the greedy probe planner (probe fitted on training layouts) and a random policy. BFS is
    the optimum. Checkpoints go to runs/ under the CLI's names, so a finished `--layouts procedural` run is reused
    (one trained before the held-out layouts became new up to symmetry must be moved aside: its name is the same)."""
    shipped = shipped_layouts_runs()
    rows = []
    for size in sizes:
        fields = size_overrides(size, over)
        for count in counts:
            K = UNLIMITED_LAYOUTS if count == "unlimited" else int(count)
            for seed in seeds:
                cfg = layouts_config(profile, size, seed, steps, num_layouts=K, over=fields)
                run, record = layouts_run(cfg, shipped)
                t0 = time.perf_counter()
                # a shipped run: its latest evaluation by evaluate_unseen (the command line's own has no graph planner)
                evaluations = [e["metrics"] for e in (record or {}).get("evaluations", [])]
                scored = [m for m in evaluations if "heldout_graph_success" in m]
                metrics = scored[-1] if scored else L.evaluate_unseen(run.model, run.world)
                row = {"grid_size": size, "layouts": count, "distinct_layouts": K, "seed": seed, "overrides": fields}
                row |= {"profile": profile, "batch_size": cfg.batch_size, "num_steps": cfg.num_steps}
                gpu = g.default_out_path(cfg).with_suffix(".gpu.json")  # trained on a GPU by bench/gpu_layouts.py
                row["trained_on"] = (
                    record["device"]
                    if record
                    else json.loads(gpu.read_text())["device"]
                    if gpu.exists()
                    else g.describe_device(torch.device("cpu"))
                )
                row |= {"train_seconds": run.total_train_seconds, **metrics}
                # the search's settings as planned (None: a shipped run's evaluation from before they were recorded)
                row |= {k: metrics.get(k) for k in IMAGINE_SETTINGS}
                row |= split_fields(record, metrics if scored else None)
                row["eval_seconds"] = time.perf_counter() - t0
                row = stamp("layouts", row, cfg, row["trained_on"])
                rows.append(row)
                if save is not None:
                    save([row])
                print(
                    f"{size}x{size}, {count:>9s} layouts, seed {seed}: next-state on training layouts"
                    f" {metrics['training_layouts_next_state_accuracy']:.3f}, held-out"
                    f" {metrics['heldout_next_state_accuracy']:.3f} | held-out planning: "
                    + " ".join(
                        f"{p} {metrics.get(f'heldout_{p}_success', float('nan')):.3f}"
                        for p in ("imagine", "imagine_memory", "imagine_tried", "graph", "probe", "random")
                    )
                    + (f" | named: imagine {metrics['named_imagine_success']:.3f}" if size == 5 else "")
                    + f" | {run.total_train_seconds:.0f} s",
                    flush=True,
                )
    return rows


def imagine_maps_study(seeds: list[int], profile: str = "layouts", steps: int | None = None, save=None) -> list[dict]:
    """What the imagination search imagines, read against the true layouts (g.imagined_map_fidelity, privileged):
    searches from every free cell of the 200 held-out layouts and of the four named ones, with the planner's
    settings, for the 5x5 layouts models of the layouts study (the same checkpoints: shipped, or in runs/, trained if
    missing). Per depth d: the share of searches that imagine every cell within d moves at its true distance, and the
    share with no phantom place within d moves."""
    shipped, rows = shipped_layouts_runs(), []
    sets = {"held-out": g.heldout_layouts(5, 200), "named": np.stack([g.layout_walls(n) for n in g.LAYOUTS])}
    for seed in seeds:
        cfg = layouts_config(profile, 5, seed, steps)
        run, record = layouts_run(cfg, shipped)
        g.calibrate_batchnorm(run.model, run.world)  # as L.evaluate_unseen does before the layouts study's figures
        for name, layouts in sets.items():
            t0 = time.perf_counter()
            family = g.WorldFamily(layouts, image_size=run.model.encoder.image_size)
            row = {"profile": profile, "seed": seed, "num_steps": cfg.num_steps, "layouts": name}
            row |= L.imagination_settings() | L.imagined_map_fidelity(run.model, family) | split_fields(record)
            row["seconds"] = time.perf_counter() - t0
            row = stamp("imagine-maps", row, cfg)
            rows.append(row)
            if save is not None:
                save([row])
            print(
                f"{profile} seed {seed}, {name:8s} ({row['searches']} searches): complete "
                + " ".join(f"{v:.0%}" for v in row["complete"])
                + " | no phantom "
                + " ".join(f"{v:.0%}" for v in row["no_phantom"]),
                flush=True,
            )
    return rows


BUDGET_PLANNERS = ("imagine", "imagine_tried", "random_tried")  # the agent without and with its memory; the control


def budget_study(
    sizes: list[int], seeds: list[int], profile="layouts", steps=None, times=3, save=None, over=None
) -> list[dict]:
    """How many steps does the agent need? The layouts study's models (the same checkpoints: shipped, or in runs/,
    trained if missing) plan the same 2,000 held-out pairs as there, with ``times`` x the step budget every reported
    figure uses (2 x the longest shortest path + G): the agent-only search without memory and remembering all it
    tried (run_mpc's remember_tried), and the control, a random policy with the same memory and no model. Each row
    keeps, per planner, the share of pairs solved within b steps for every b up to the longer budget. An episode is
    planned step for step as under the shorter budget, so at b = the budget the shares are the layouts study's."""
    shipped, rows = shipped_layouts_runs(), []
    for size in sizes:
        layouts, fields = g.heldout_layouts(size, 200), size_overrides(size, over)
        for seed in seeds:
            cfg = layouts_config(profile, size, seed, steps, over=fields)
            run, record = layouts_run(cfg, shipped)
            g.calibrate_batchnorm(run.model, run.world)  # as L.evaluate_unseen does
            family = g.WorldFamily(layouts, image_size=run.model.encoder.image_size)
            starts, goals = g.sample_pairs(family, 10, 0)  # L.evaluate_unseen's pairs
            budget = L.step_budget(family, L.shortest_distances(family, starts, goals))  # run_mpc's default
            row = {"grid_size": size, "seed": seed, "profile": profile, "num_steps": cfg.num_steps, "overrides": fields}
            row |= {"pairs": len(starts), "budget": budget, "max_steps": times * budget, **IMAGINE_SETTINGS}
            row |= split_fields(record)
            t0 = time.perf_counter()
            for name in BUDGET_PLANNERS:
                policy = g.make_policy(name.removesuffix("_tried"), run.model, family)  # as L.evaluate_unseen
                with torch.no_grad():
                    result = g.run_mpc(
                        family, policy, starts, goals, max_steps=times * budget, remember_tried=name.endswith("_tried")
                    )
                row[f"{name}_solved_within"] = [
                    float((result.steps <= b).float().mean()) for b in range(times * budget + 1)
                ]
                row[f"{name}_optimal"] = float(result.optimal.float().mean())
            row["seconds"] = time.perf_counter() - t0
            row = stamp("budget", row, cfg)
            rows.append(row)
            if save is not None:
                save([row])
            print(
                f"{size}x{size} {profile}, {cfg.num_steps:,} steps, seed {seed}, {len(starts):,} pairs,"
                f" budget {budget}: "
                + " | ".join(
                    f"{name} "
                    + " ".join(f"{k}x {row[f'{name}_solved_within'][k * budget]:.1%}" for k in range(1, times + 1))
                    for name in BUDGET_PLANNERS
                )
                + f" | {row['seconds']:.0f} s",
                flush=True,
            )
    return rows


def check_only(only: list[str] | None, known, what: str) -> None:
    """--only: stop before any work, naming the argument, if it names a row or model the study does not have."""
    unknown = set(only or ()) - set(known)
    if unknown:
        raise SystemExit(f"--only: unknown {what} {sorted(unknown)}; expected some of {sorted(known)}")


NEAR_BINS = 4  # walls next to a cell, and walls two steps from it, counted 0, 1, 2, 3 or more


def walls_beside(layouts: np.ndarray) -> np.ndarray:
    """(K, G, G) bool -> (K, G, G) int: the walls among each cell's 4 neighbours (the board's edge is no wall)."""
    w = np.pad(layouts, ((0, 0), (1, 1), (1, 1)))  # (K, G + 2, G + 2)
    return w[:, :-2, 1:-1].astype(int) + w[:, 2:, 1:-1] + w[:, 1:-1, :-2] + w[:, 1:-1, 2:]


def walls_near(walls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every cell of a layout (G, G): how many of its 4 neighbours are walls, and how many cells two steps away
    (Manhattan distance 2) are walls. Only walls count, not the border. Two (G, G) int arrays."""
    steps = np.add.outer(np.abs(np.arange(-2, 3)), np.abs(np.arange(-2, 3)))  # from the middle of a 5x5 window
    two_away = ndimage.convolve(walls.astype(int), (steps == 2).astype(int), mode="constant")
    return walls_beside(walls[None])[0], two_away


def transition_errors(model: g.JEPA, layouts: np.ndarray) -> dict:
    """What a layouts model gets wrong in layouts (K, G, G), over every (free cell, action) pair (g.next_state_table):
    real moves read as right, as a stay (the nearest real latent to the prediction is the agent's own cell) or as
    another cell; wall bumps read as right. For each move read as a stay, how far along the way to the true next
    latent the predicted one lies (0: at the current cell's latent, 1: at the next one's). The share of moves read
    wrong by the cell they lead to: (G, G), row-major. And the moves and the moves read wrong counted by where the
    cell they lead to lies and what is around it: (ring, walls next to it, walls two steps away), the ring being its
    distance from the board's centre (0: the middle cells, (G + 1) // 2 - 1: the border; max(|row - c|, |col - c|)
    rounded down, c = (G - 1) / 2) and the wall counts clipped at NEAR_BINS - 1 (walls_near)."""
    G = layouts.shape[1]
    counts = dict.fromkeys(("moves", "moves_right", "moves_as_stays", "bumps", "bumps_right"), 0)
    along, by_cell = [], np.zeros((2, G * G))  # (moves, moves wrong) by destination cell
    by_near = np.zeros((2, (G + 1) // 2, NEAR_BINS, NEAR_BINS), dtype=np.int64)  # (moves, wrong) by ring, walls
    rows, cols = np.divmod(np.arange(G * G), G)
    ring = np.maximum(np.abs(rows - (G - 1) / 2), np.abs(cols - (G - 1) / 2)).astype(int)
    for walls in layouts:
        t = L.next_state_table(model, g.World(G, walls=walls, image_size=model.encoder.image_size))
        move, right = ~t["bump"], t["predicted"] == t["next"]
        as_stay = move & (t["predicted"] == t["cell"])
        counts["moves"] += int(move.sum())
        counts["moves_right"] += int((move & right).sum())
        counts["moves_as_stays"] += int(as_stay.sum())
        counts["bumps"] += int((~move).sum())
        counts["bumps_right"] += int((~move & right).sum())
        z0, z1, zp = (t[k][as_stay] for k in ("latent", "next_latent", "predicted_latent"))
        along.append(((zp - z0) * (z1 - z0)).sum(-1) / (z1 - z0).pow(2).sum(-1).clamp_min(1e-12))
        nxt, wrong = t["next"][move].numpy(), (~right)[move].numpy()  # each move's next cell; read wrong?
        np.add.at(by_cell, (0, nxt), 1)
        np.add.at(by_cell, (1, nxt[wrong]), 1)
        where = (ring[nxt], *(np.minimum(a.reshape(-1), NEAR_BINS - 1)[nxt] for a in walls_near(walls)))
        np.add.at(by_near[0], where, 1)
        np.add.at(by_near[1], tuple(w[wrong] for w in where), 1)
    along = torch.cat(along).numpy()
    return counts | {
        "as_stay_along_quartiles": np.quantile(along, [0.25, 0.5, 0.75]).round(3).tolist() if len(along) else [],
        "move_error_by_cell": (by_cell[1] / np.maximum(by_cell[0], 1)).reshape(G, G).round(3).tolist(),
        "moves_by_ring_walls_near": by_near[0].tolist(),
        "wrong_by_ring_walls_near": by_near[1].tolist(),
    }


def transition_errors_study(
    sizes: list[int],
    seeds: list[int],
    profile: str = "layouts",
    steps=None,
    readers: list[str] | None = None,
    over=None,
    save=None,
) -> list[dict]:
    """transition_errors on the 200 held-out layouts for the layouts study's unlimited-layouts models (the same
    checkpoints: shipped, or in runs/, trained if missing), BatchNorm calibrated on the training layouts as
    L.evaluate_unseen does. ``readers``: instead, the readers study's 8x8 models of these READER_ROWS (its
    checkpoints in runs/, each with the step count its readers_study.json row records, or ``steps``; trained if
    missing)."""
    if readers:
        if profile != "layouts":
            raise SystemExit(f"--profile: the readers study's models use the layouts profile, got {profile!r}")
        check_only(readers, READER_ROWS, "row")
        raced = {}  # (row, seed) -> the step count the readers study gave it, its row found by overrides and seed
        if steps is None:
            path = L.ASSETS / STUDIES["readers"]
            saved = {(json.dumps(r["overrides"], sort_keys=True), r["seed"]): r for r in results.load(path)["rows"]}
            for name, seed in itertools.product(readers, seeds):
                row = saved.get((json.dumps(READER_ROWS[name], sort_keys=True), seed))
                if row is not None:
                    raced[name, seed] = row["num_steps"]
            missing = [(name, seed) for name in readers for seed in seeds if (name, seed) not in raced]
            if missing:
                raise SystemExit(f"--only/--seeds: {missing} not in {path.name}; run bench/studies.py readers first")
        runs = [(8, seed, READER_ROWS[name], steps or raced[name, seed], name) for name in readers for seed in seeds]
    else:
        runs = [(size, seed, size_overrides(size, over), steps, None) for size in sizes for seed in seeds]
    shipped, rows = shipped_layouts_runs(), []
    for size, seed, fields, num_steps, name in runs:
        if name is None:
            cfg = layouts_config(profile, size, seed, num_steps, over=fields)
            run, record = layouts_run(cfg, shipped)
        else:
            cfg = readers_config(seed, num_steps, fields)
            run, record = g.train(cfg, ckpt_path=g.default_out_path(cfg), progress=False), None
        g.calibrate_batchnorm(run.model, run.world)
        row = {"grid_size": size, "profile": cfg.profile, "seed": seed, "num_steps": cfg.num_steps, "overrides": fields}
        row |= ({"readers_row": name} if name else {}) | {"train_seconds": run.total_train_seconds}
        row |= {"layouts": "held-out", **transition_errors(run.model, g.heldout_layouts(size, 200))}
        row |= split_fields(record)
        row = stamp("transition-errors", row, cfg)
        rows.append(row)
        if save is not None:
            save([row])
        print(
            f"{size}x{size} {name or profile} seed {seed}, {cfg.num_steps} steps: moves right"
            f" {row['moves_right'] / row['moves']:.3f} (read as a stay {row['moves_as_stays'] / row['moves']:.3f},"
            f" predicted {row['as_stay_along_quartiles']} of the way), bumps right"
            f" {row['bumps_right'] / row['bumps']:.3f}",
            flush=True,
        )
    return rows


TUNING_RULES = ("consistent",)  # the one bump rule the module has; rows of removed rules keep their commit
TUNING_MERGES = (0.3, 0.4, 0.5)
TUNING_MEETS = ("both", "either")


def imagine_tuning_study(
    pairs_per_layout: int = 10, only: list[str] | None = None, rules=TUNING_RULES, save=None
) -> list[dict]:
    """The imagination search's three settings - the bump rule, the merge radius and when the two searches meet - on
    data that no reported figure uses: the shipped layouts models on the 200 validation layouts
    (lab.validation_layouts: never trained on, never tested; 10 seeded pairs each), and the shipped single-layout
    models on every pair of their own layout (which is also what their reported figures use, so those rows only
    guard against harm). ``only``: these models' rows (e.g. "layouts (cpu)" after it was retrained); ``rules``: these
    bump rules' rows (e.g. a new one)."""
    rows = []
    models = {"layouts (GPU)": "gridjepa_layouts_gpu.pt", "layouts (cpu)": "gridjepa_layouts.pt"}
    models |= {f"cpu {name}": f"gridjepa_cpu{'' if name == 'open' else '_' + name}.pt" for name in g.LAYOUTS}
    check_only(only, models, "model")
    models = {k: v for k, v in models.items() if not only or k in only}
    for label, file in models.items():
        model, cfg = L.load_model(L.ASSETS / file)
        world = g.build_world(cfg)
        g.calibrate_batchnorm(model, world)
        if cfg.num_layouts:
            world = g.WorldFamily(L.validation_layouts(cfg.grid_size), image_size=model.encoder.image_size)
            starts, goals = g.sample_pairs(world, pairs_per_layout, 0)
        else:
            starts, goals = world.all_pairs()
        for rule, merge, meet in itertools.product(rules, TUNING_MERGES, TUNING_MEETS):
            policy = g.imagination_policy(model, world, merge=merge, meet=meet)
            plan = g.run_mpc(world, policy, starts, goals).summary()
            row = {"model": label, "checkpoint": file, "rule": rule, "merge": merge, "meet": meet, "pairs": len(starts)}
            row |= {k: plan[k] for k in ("success", "optimal", "seconds")}
            row = stamp("imagine-tuning", row, cfg)
            rows.append(row)
            if save is not None:
                save([row])
            print(
                f"{label:16s} rule {rule:10s} merge {merge} meet {meet:6s}: {plan['success']:.1%} solved,"
                f" {plan['optimal']:.1%} optimal ({plan['seconds']:.0f} s)",
                flush=True,
            )
    return rows


RECIPE_ROWS = {  # name -> overrides of the cpu profile: the schedules compared when the recipe's 450 steps were chosen
    "300 steps, ramp 0.5 (the earlier recipe)": {"num_steps": 300},
    "300 steps, ramp 0.75": {"num_steps": 300, "smooth_ramp": 0.75},
    "450 steps, ramp 0.5 (the recipe)": {},
    "300 steps, ramp 1": {"num_steps": 300, "smooth_ramp": 1.0},
}


def recipe_tuning_study(num_layouts: int = 8, seeds=(0, 1), only: list[str] | None = None, save=None) -> list[dict]:
    """How the cpu recipe's schedule was chosen, on data no reported figure uses: each candidate trained on each of
    the first ``num_layouts`` validation layouts (lab.validation_layouts: never trained on by the layouts models,
    never reported), per seed; imagination search (the undo rule) on every pair of the layout, with and without
    bump memory, and next-state accuracy. The open board's PC1 + PC2 for each candidate is in the geometry study."""
    rows = []
    layouts = L.validation_layouts(5)[:num_layouts]
    for name in [n for n in RECIPE_ROWS if not only or n in only]:
        for k, walls in enumerate(layouts):
            for seed in seeds:
                cfg = g.make_config("cpu", seed=seed, **RECIPE_ROWS[name])
                world = g.World(5, walls=walls)
                run = g.train(cfg, world=world, progress=False)
                row = {"row": name, "validation_layout": k, "seed": seed, "overrides": RECIPE_ROWS[name]}
                row |= {"walls": int(walls.sum()), "train_seconds": run.train_seconds, **IMAGINE_SETTINGS}
                row["next_state_accuracy"] = g.next_state_accuracy(run.model, world)
                for label, memory in (("imagine", False), ("imagine (remembers bumps)", True)):
                    row[label] = plan_summary(world, g.imagination_policy(run.model, world), remember_bumps=memory)
                row = stamp("recipe-tuning", row, cfg)
                rows.append(row)
                if save is not None:
                    save([row])
                print(
                    f"{name:42s} validation layout {k} seed {seed}: next-state {row['next_state_accuracy']:.3f}"
                    f" | imagine {row['imagine']['success']:.3f}"
                    f" (remembering bumps {row['imagine (remembers bumps)']['success']:.3f})"
                    f" | {run.train_seconds:.0f} s",
                    flush=True,
                )
    return rows


READER_ROWS = {  # name -> overrides of the layouts profile on 8x8
    "64x64 input, patch 8, 1 block (the earlier 8x8 recipe)": {"input_size": 64},
    "64x64 input, patch 16, 1 block (the 8x8 recipe)": {"input_size": 64, "patch_size": 16},
    "64x64 input, patch 16, 2 blocks": {"input_size": 64, "patch_size": 16, "depth": 2},
    "128x128 input, patch 16, 1 block": {"input_size": 128, "patch_size": 16},
    "32x32 input, patch 8, 1 block (the 5x5 recipe)": {"input_size": 32},
    "64x64 input, patch 16, 1 block, predictor 4 blocks": {"input_size": 64, "patch_size": 16, "pred_depth": 4},
    "64x64 input, patch 16, 1 block, patch latents": {"input_size": 64, "patch_size": 16, "spatial": True},
    "64x64 input, patch 16, 1 block, width 256": {"input_size": 64, "patch_size": 16, "width": 256, "pred_width": 256},
    "64x64 input, patch 32, 1 block": {"input_size": 64, "patch_size": 32},
    "128x128 input, patch 32, 1 block": {"input_size": 128, "patch_size": 32},
    "64x64 input, patch 16, 1 block, conv stem": {"input_size": 64, "patch_size": 16, "stem": "conv"},
    "64x64 input cropped to the board, patch 8, 1 block": {"input_size": 64, "patch_size": 8, "crop": True},
    "64x64 input cropped to the board, patch 16, 1 block": {"input_size": 64, "patch_size": 16, "crop": True},
    "64x64 input, patch 16, 1 block, flattened tokens": {"input_size": 64, "patch_size": 16, "pool": "flat"},
    "64x64 input cropped to the board, patch 16, 1 block, flattened tokens": {
        "input_size": 64,
        "patch_size": 16,
        "crop": True,
        "pool": "flat",
    },
}


def readers_config(seed: int, steps: int | None, overrides: dict) -> g.Config:
    """A readers-study candidate's config: the layouts profile on 8x8 with the row's overrides (``steps`` None: the
    profile's step count)."""
    more = {} if steps is None else {"num_steps": steps}
    return g.make_config("layouts", grid_size=8, seed=seed, **overrides, **more)


def readers_study(budget: float = 300.0, seeds=(0,), only: list[str] | None = None, save=None) -> list[dict]:
    """Which encoder reads an 8x8 layout's walls best for the same CPU time: each candidate trains the layouts
    recipe on 8x8 for ``budget`` seconds of steps (its step time measured first by L.estimate_train_time; the cosine
    schedule ends on the last step) and is scored by next-state accuracy on 100 validation layouts
    (lab.validation_layouts: never trained on, never reported), beside the training layouts' own."""
    check_only(only, READER_ROWS, "row")
    rows = []
    val = g.WorldFamily(L.validation_layouts(8, 100))
    for name in [n for n in READER_ROWS if not only or n in only]:
        for seed in seeds:
            over = READER_ROWS[name]
            estimate = L.estimate_train_time(readers_config(seed, None, over))
            steps = max(1, int(budget / estimate["seconds_per_step"]))
            cfg = readers_config(seed, steps, over)
            run = g.train(cfg, ckpt_path=g.default_out_path(cfg), progress=False)
            g.calibrate_batchnorm(run.model, run.world)
            seen = g.WorldFamily(run.world.layouts[:100], image_size=run.world.image_size)
            row = {"row": name, "seed": seed, "budget_seconds": budget, "overrides": over, "num_steps": steps}
            row |= {"seconds_per_step": estimate["seconds_per_step"], "train_seconds": run.total_train_seconds}
            row["training_layouts_next_state_accuracy"] = g.next_state_accuracy(run.model, seen)
            row["validation_next_state_accuracy"] = g.next_state_accuracy(run.model, val)
            row["curve"] = {"step": run.history["eval_step"], "next_state_accuracy": run.history["next_state_acc"]}
            row = stamp("readers", row, cfg)
            rows.append(row)
            if save is not None:
                save([row])
            print(
                f"{name:55s} seed {seed}: {steps} steps ({estimate['seconds_per_step']:.3f} s each) | next-state:"
                f" training layouts {row['training_layouts_next_state_accuracy']:.3f},"
                f" validation {row['validation_next_state_accuracy']:.3f} | {run.total_train_seconds:.0f} s",
                flush=True,
            )
    return rows


LONG_RUNS = [  # readers the layouts study ran long on 8x8: name, overrides, schedule, seed, a note
    (
        "64x64 input, patch 16, 1 block (the 8x8 recipe)",
        READER_ROWS["64x64 input, patch 16, 1 block (the 8x8 recipe)"],
        20000,
        0,
        "",
    ),
    (
        "64x64 input, patch 32, 1 block",
        READER_ROWS["64x64 input, patch 32, 1 block"],
        20000,
        0,
        "; stopped after 10,000 steps, its training curve flat since step 3,000",
    ),
    (
        "64x64 input cropped to the board, patch 16, 1 block, flattened tokens",
        READER_ROWS["64x64 input cropped to the board, patch 16, 1 block, flattened tokens"],
        12000,
        0,
        "",
    ),
    (
        "64x64 input cropped to the board, patch 16, 1 block, flattened tokens, 250,000 transitions",
        READER_ROWS["64x64 input cropped to the board, patch 16, 1 block, flattened tokens"]
        | {"num_transitions": 250_000},
        12000,
        0,
        " (the 8x8 recipe since)",
    ),
    (
        "64x64 input cropped to the board, patch 16, 1 block, flattened tokens, 250,000 transitions, 20,000 steps",
        READER_ROWS["64x64 input cropped to the board, patch 16, 1 block, flattened tokens"]
        | {"num_transitions": 250_000},
        20000,
        0,
        "",
    ),
    (
        "64x64 input cropped to the board, patch 16, 1 block, flattened tokens, 500,000 transitions, 20,000 steps",
        READER_ROWS["64x64 input cropped to the board, patch 16, 1 block, flattened tokens"]
        | {"num_transitions": 500_000},
        20000,
        1,
        "; seed 1: seed 0's checkpoint was not kept",
    ),
]


def long_runs_study(only: list[str] | None = None, saved: list[dict] | None = None) -> list[dict]:
    """The long runs' training curves, read from their checkpoints in runs/ (the layouts study's, under the CLI's
    names; a run not there is named with the command that trains it). Saved beside the readers rows as long_runs.
    ``only``: read these runs; the others are kept from ``saved`` (the long_runs saved before)."""
    check_only(only, dict.fromkeys(name for name, *_ in LONG_RUNS), "long run")
    kept = {r["row"]: r for r in saved or []}
    runs = []
    for name, over, steps, seed, note in LONG_RUNS:
        if only and name not in only:
            if name in kept:
                runs.append(kept[name])
            continue
        cfg = layouts_config("layouts", 8, seed, steps, over=over)
        path = g.default_out_path(cfg)
        how = "python bench/studies.py layouts --sizes 8 --counts unlimited --steps"
        how += f" {steps}" + (f" --seeds {seed}" if seed else "") + f" --overrides '{json.dumps(over)}'"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: train it with {how}")
        ckpt = g.load_checkpoint(path, cfg)
        history = ckpt["history"]
        run = {"row": name, "seed": seed, "overrides": over, "num_steps": steps, "steps_run": ckpt["step"]}
        run |= {"train_seconds": ckpt["train_seconds"], "how": how + note}
        run |= {"curve": {"step": history["eval_step"], "next_state_accuracy": history["next_state_acc"]}}
        runs.append(stamp("long-runs", run, cfg))
        print(
            f"{name}: {ckpt['step']:,} of {steps:,} steps, {history['next_state_acc'][-1]:.3f} at the last", flush=True
        )
    return runs


WALL_BIAS = 2.0  # a start cell's weight in the wall-biased data: 1 + WALL_BIAS x the walls among its 4 neighbours


def wall_biased_transitions(world: g.WorldFamily, num: int, seed: int, bias: float = WALL_BIAS) -> g.Transitions:
    """One-step transitions whose starts favour walls: a free cell is drawn with weight 1 + bias x the walls among
    its 4 neighbours (the board's edge is no wall), so a cell in a corridor or by a door is drawn up to 1 + 3 x bias
    times as often as an open one; actions stay uniform, so both the bumps and the moves beside walls grow."""
    adjacent = walls_beside(world.layouts).reshape(-1)  # (K * N,)
    weight = torch.from_numpy(1 + bias * adjacent[world.free_cells].astype(np.float64))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.from_numpy(world.free_cells)[torch.multinomial(weight, num, replacement=True, generator=gen)]
    actions = torch.randint(len(g.ACTIONS), (num, 1), generator=gen)
    states = torch.stack([starts, world.next_cell[starts, actions[:, 0]]], 1)  # (num, 2)
    return g.Transitions(states.to(torch.int32), actions.to(torch.uint8))


def data_card(world: g.WorldFamily, data: g.Transitions) -> dict:
    """What a dataset visits: the mean number of walls next to its start cells, and the share of moves that bump."""
    adjacent = walls_beside(world.layouts).reshape(-1)
    states = data.states.long()  # (B, T): a move that bumps leaves the state as it was
    wall_hits = float((states[:, 1:] == states[:, :-1]).float().mean())
    return {"start_walls_adjacent": float(adjacent[states[:, 0].numpy()].mean()), "wall_hit_share": wall_hits}


def wall_data_study(seeds: list[int], steps: int = 20_000, bias: float = WALL_BIAS, save=None) -> list[dict]:
    """The 8x8 layouts recipe trained on wall-biased data (wall_biased_transitions: the same number of one-step
    transitions of the same layouts, starts favouring cells beside walls) in place of uniform starts. Each model is
    scored on 200 validation layouts (imagination search alone and remembering what it tried, 10 seeded pairs each;
    next-state accuracy) and with lab.evaluate_unseen on the 200 held-out layouts. The data card of both datasets is
    in the row; today's recipe (uniform starts) is the layouts study's row of the same seed."""
    rows = []
    for seed in seeds:
        cfg = layouts_config("layouts", 8, seed, steps)
        world = g.build_world(cfg)
        data = wall_biased_transitions(world, cfg.num_transitions, cfg.data_seed, bias)
        uniform = g.make_transitions(world, cfg.num_transitions, cfg.seq_len, cfg.data_seed)  # today's data
        card = {f"biased_{k}": v for k, v in data_card(world, data).items() if isinstance(v, float)}
        card |= {f"uniform_{k}": v for k, v in data_card(world, uniform).items() if isinstance(v, float)}
        default = g.default_out_path(cfg)
        run = g.train(cfg, world, data, ckpt_path=default.with_name(f"walls{bias:g}_{default.name}"), progress=False)
        t0 = time.perf_counter()
        metrics = L.evaluate_unseen(run.model, run.world)  # calibrates BatchNorm on the training layouts
        family = g.WorldFamily(L.validation_layouts(8, 200), image_size=run.model.encoder.image_size)
        starts, goals = g.sample_pairs(family, 10, 0)
        policy = L.asked_once(g.imagination_policy(run.model, family))
        row = {"grid_size": 8, "seed": seed, "num_steps": cfg.num_steps, "wall_bias": bias, "profile": cfg.profile}
        row |= {"overrides": size_overrides(8), "train_seconds": run.total_train_seconds, **card}
        row["validation_next_state_accuracy"] = g.next_state_accuracy(run.model, family)
        for memory in ("", "_tried"):
            result = g.run_mpc(family, policy, starts, goals, remember_tried=memory == "_tried")
            row[f"validation_imagine{memory}_success"] = float(result.success.float().mean())
            row[f"validation_imagine{memory}_optimal"] = float(result.optimal.float().mean())
        row |= metrics | split_fields(None) | {"eval_seconds": time.perf_counter() - t0}
        row = stamp("wall-data", row, cfg)
        rows.append(row)
        if save is not None:
            save([row])
        print(
            f"8x8 wall-biased data (bias {bias:g}), seed {seed}: validation imagine"
            f" {row['validation_imagine_success']:.4f}, tried {row['validation_imagine_tried_success']:.4f}, next-state"
            f" {row['validation_next_state_accuracy']:.4f} | held-out imagine {metrics['heldout_imagine_success']:.4f}"
            f" | {run.total_train_seconds:.0f} s",
            flush=True,
        )
    return rows


ENSEMBLE_COMBINES = ("min", "sum")  # how the members' imagined path lengths per first action are joined


def ensemble_policy(policies: list, combine: str) -> g.Policy:
    """Several models plan as one: each member's imagination search scores the 4 first actions by the length of the
    shortest imagined path through it; "min" takes the best of the members' scores (a path any member imagines
    counts: a move one model reads as a wall bump another may read right), "sum" adds them (every member must
    agree). The action with the best joined score is taken; run_mpc's memories read the joined scores."""

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        scores = torch.stack([p(cells, goals)["scores"].float() for p in policies])  # (M, P, A)
        joined = scores.amin(0) if combine == "min" else scores.sum(0)  # (P, A)
        return {"action": joined.argmin(1), "scores": joined}

    return policy


def ensemble_study(size: int, members: list[int], profile: str = "layouts", steps=None, save=None) -> list[dict]:
    """An ensemble of the layouts study's models (the same checkpoints, one per seed in ``members``): the members'
    imagination searches joined (ensemble_policy) against each member alone, without memory and remembering all it
    tried, within the layouts study's step budget, on the same 10 seeded pairs per layout. First on 200 validation
    layouts (lab.validation_layouts: never trained on, never reported elsewhere) to choose how to join, then on the
    200 held-out layouts every reported figure uses. Each member is calibrated on its own training layouts."""
    shipped, rows, runs = shipped_layouts_runs(), [], []
    for seed in members:
        cfg = layouts_config(profile, size, seed, steps)
        run, record = layouts_run(cfg, shipped)
        g.calibrate_batchnorm(run.model, run.world)  # as the layouts study's evaluation does
        runs.append((cfg, run, record))
    for name, layouts in (("validation", L.validation_layouts(size, 200)), ("heldout", g.heldout_layouts(size, 200))):
        family = g.WorldFamily(layouts, image_size=runs[0][1].model.encoder.image_size)
        starts, goals = g.sample_pairs(family, 10, 0)
        budget = L.step_budget(family, L.shortest_distances(family, starts, goals))
        alone = [L.asked_once(g.imagination_policy(run.model, family)) for _, run, _ in runs]  # each search once
        planners = {f"s{seed}": [policy] for seed, policy in zip(members, alone)}
        planners |= {combine: alone for combine in ENSEMBLE_COMBINES}
        for combine, policies in planners.items():
            t0 = time.perf_counter()
            policy = policies[0] if len(policies) == 1 else ensemble_policy(policies, combine)
            row = {"grid_size": size, "layouts": name, "pairs": len(starts), "budget": budget, "combine": combine}
            row |= {"members": members if len(policies) > 1 else [int(combine[1:])], "profile": profile}
            row |= {"num_steps": runs[0][0].num_steps, "overrides": size_overrides(size), **IMAGINE_SETTINGS}
            for memory in ("", "_tried"):
                result = g.run_mpc(family, policy, starts, goals, budget, remember_tried=memory == "_tried")
                row[f"imagine{memory}_success"] = float(result.success.float().mean())
                row[f"imagine{memory}_optimal"] = float(result.optimal.float().mean())
            row |= split_fields(runs[0][2]) | {"seconds": time.perf_counter() - t0}
            cfg = runs[members.index(row["members"][0])][0]
            row = stamp("ensemble", row, cfg)
            rows.append(row)
            if save is not None:
                save([row])
            print(
                f"{size}x{size} {name}, {combine}: imagine {row['imagine_success']:.4f}"
                f" (optimal {row['imagine_optimal']:.4f}), remembering what it tried {row['imagine_tried_success']:.4f}"
                f" | {row['seconds']:.0f} s",
                flush=True,
            )
    return rows


STUDIES = {  # name -> its file in assets/ (bench/results.py writes it; a row redone replaces the row of its id)
    "recipe-tuning": "recipe_tuning.json",
    "probes": "probe_study.json",
    "scaling": "scaling.json",
    "geometry": "geometry_study.json",
    "layouts-geometry": "layouts_geometry.json",
    "layouts": "layouts_study.json",
    "imagine-tuning": "imagine_tuning.json",
    "imagine-maps": "imagine_maps.json",
    "readers": "readers_study.json",
    "long-runs": "long_runs.json",
    "transition-errors": "transition_errors.json",
    "budget": "budget_study.json",
    "ensemble": "ensemble_study.json",
    "wall-data": "wall_data_study.json",
    "writeup-size": "writeup_size.json",
}


def main() -> None:
    g.keep_freed_memory()  # as the command-line job: training steps reuse freed memory
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 8, 12])
    parser.add_argument(
        "--only",
        nargs="+",
        help="probes/geometry/recipe-tuning/imagine-tuning/readers/transition-errors/long-runs: these rows, models or"
        " runs only",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="scaling, layouts, imagine-maps, transition-errors, budget: training steps (default: per size; the"
        " profile's)",
    )
    parser.add_argument(
        "--profile",
        default="layouts",
        choices=("layouts", "layouts_gpu", "smoke"),
        help="layouts, imagine-maps, transition-errors, budget (smoke: a seconds-long check of the study's code)",
    )
    parser.add_argument(
        "--overrides",
        type=json.loads,
        help="layouts, transition-errors, budget: the Config fields (JSON) the runs change in place of the grid"
        """ size's LAYOUTS_SIZE_OVERRIDES; the earlier 8x8 reader: '{"input_size": 64, "patch_size": 16}'""",
    )
    parser.add_argument("--budget", type=float, default=300.0, help="readers: seconds of training per row")
    parser.add_argument("--smooth", type=float, help="scaling: smoothness weight (default: the cpu profile's)")
    parser.add_argument("--ramp", type=float, help="scaling: share of training the smoothness weight ramps in over")
    parser.add_argument("--grid-layouts", nargs="+", default=list(SCALING_LAYOUTS), choices=SCALING_LAYOUTS)
    parser.add_argument("--counts", nargs="+", default=list(LAYOUT_COUNTS), choices=LAYOUT_COUNTS, help="layouts study")
    parser.add_argument("--rules", nargs="+", default=list(TUNING_RULES), choices=TUNING_RULES, help="imagine-tuning")
    parser.add_argument("--out-dir", type=Path, default=L.ASSETS, help="where the study's JSON is (default: assets/)")
    args = parser.parse_args()
    if args.overrides is not None and not isinstance(args.overrides, dict):
        parser.error(f"--overrides must be a JSON object of Config fields, got {args.overrides!r}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if not (math.isfinite(args.budget) and args.budget > 0):
        parser.error(f"--budget must be a finite number of seconds above 0, got {args.budget:g}")
    if min(args.seeds) < 0:
        parser.error(f"--seeds must be integers >= 0, got {args.seeds}")
    if not all(2 <= s <= 16 for s in args.sizes):
        parser.error(f"--sizes must be grid sizes in [2, 16], got {args.sizes}")
    if args.smooth is not None and not (math.isfinite(args.smooth) and args.smooth >= 0):
        parser.error(f"--smooth must be a finite number >= 0, got {args.smooth:g}")
    if args.ramp is not None and not 0 <= args.ramp <= 1:
        parser.error(f"--ramp must be in [0, 1], got {args.ramp:g}")
    if unknown := set(args.overrides or ()) - {f.name for f in dataclasses.fields(g.Config)}:
        parser.error(f"--overrides: unknown Config fields {sorted(unknown)}")
    rows_of = {"probes": PROBE_ROWS, "geometry": GEOMETRY_ROWS, "layouts-geometry": GEOMETRY_ROWS}
    rows_of["writeup-size"] = WRITEUP_SIZE_ROWS
    if args.study in (rows_of | {"recipe-tuning": RECIPE_ROWS}):
        check_only(args.only, (rows_of | {"recipe-tuning": RECIPE_ROWS})[args.study], "row")
    args.seeds, args.sizes = list(dict.fromkeys(args.seeds)), list(dict.fromkeys(args.sizes))  # --seeds 7 7: once
    out = args.out_dir / STUDIES[args.study]
    try:  # a folder that cannot be written, or an unreadable file, stops the study before it trains anything
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
        study = results.load(out).get("study")
    except (OSError, ValueError) as e:
        parser.exit(1, f"error: --out-dir {args.out_dir}: {e}\n")
    if study not in (None, out.stem, args.study):
        parser.exit(1, f"error: {out} holds the rows of study {study!r}, not {args.study!r}: use another --out-dir\n")
    layout_sizes = args.sizes if args.sizes != [5, 8, 12] else [5, 8]  # generated layouts: 12x12 only when asked
    written = set()

    def save(rows: list[dict]) -> None:
        """Add rows to the study's file as soon as they are measured (a row of the same id is replaced)."""
        results.append_rows(out, rows, args.study)
        written.update(r["id"] for r in rows)

    if args.study == "probes":
        rows = probe_study(args.seeds, args.only, save=save)
    elif args.study == "scaling":
        rows = scaling_study(
            args.sizes, steps=args.steps, layouts=args.grid_layouts, smooth=args.smooth, ramp=args.ramp, save=save
        )
    elif args.study == "layouts":
        rows = layouts_study(
            layout_sizes,
            args.seeds,
            args.counts,
            save=save,
            profile=args.profile,
            steps=args.steps,
            over=args.overrides,
        )
    elif args.study == "geometry":
        rows = geometry_study(args.seeds, args.only, save=save)
    elif args.study == "imagine-maps":
        rows = imagine_maps_study(args.seeds, profile=args.profile, steps=args.steps, save=save)
    elif args.study == "imagine-tuning":
        rows = imagine_tuning_study(only=args.only, rules=args.rules, save=save)
    elif args.study == "recipe-tuning":
        rows = recipe_tuning_study(only=args.only, save=save)
    elif args.study == "transition-errors":
        rows = transition_errors_study(
            layout_sizes, args.seeds, args.profile, args.steps, readers=args.only, over=args.overrides, save=save
        )
    elif args.study == "readers":
        rows = readers_study(args.budget, args.seeds, args.only, save=save)
    elif args.study == "long-runs":
        rows = long_runs_study(args.only)
    elif args.study == "writeup-size":
        rows = writeup_size_study(args.seeds, args.only, save=save)
    elif args.study == "wall-data":
        rows = wall_data_study(args.seeds, args.steps or 20_000, save=save)
    elif args.study == "ensemble":
        rows = ensemble_study(
            layout_sizes[0] if args.sizes != [5, 8, 12] else 8, args.seeds, args.profile, args.steps, save=save
        )
    elif args.study == "budget":
        rows = budget_study(layout_sizes, args.seeds, args.profile, args.steps, save=save, over=args.overrides)
    else:
        rows = geometry_study(args.seeds, args.only, layouts=("two_rooms", "u_trap", "maze"), save=save)
    rest = [r for r in rows if r["id"] not in written]
    if rest:
        save(rest)
    print(f"{len(rows)} rows written to {out}")


if __name__ == "__main__":
    main()
