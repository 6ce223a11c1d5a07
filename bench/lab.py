"""Helpers only the studies in bench/ call: moved out of gridjepa_utils.py, which holds what the notebooks and the
main job use."""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gridjepa_utils as g  # noqa: E402

ASSETS = g.REPO_ROOT / "assets"  # the shipped checkpoints and the studies' results
VALIDATION_START = 500  # held-out layouts 500 on: for choosing a planner's settings, never for reporting


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[g.JEPA, g.Config]:
    """A trained model and its config from a checkpoint (g.load_run also reads the run record beside it)."""
    return (ckpt := g.load_checkpoint(path, device=device))["model_obj"], ckpt["cfg"]


def validation_layouts(grid_size: int, num: int = 200) -> np.ndarray:
    """Layouts to choose settings on: held-out layouts VALIDATION_START on, never trained on and never reported."""
    g.check_int(num, "num", 1, g.HELDOUT_RESERVED - VALIDATION_START)
    return g.heldout_layouts(grid_size, g.HELDOUT_RESERVED)[VALIDATION_START : VALIDATION_START + num]


def imagination_settings() -> dict:
    """imagination_policy's merge radius and meeting rule as defaults, recorded beside a figure planned with it."""
    defaults = inspect.signature(g.imagination_policy).parameters
    return {f"imagine_{k}": defaults[k].default for k in ("merge", "meet")}


def search_settings(world: g.World, max_depth, merge) -> tuple[int, int]:
    """imagination_policy's checks and search sizes: max_depth (default 2G) and room for 2G^2 + 1 places."""
    if isinstance(merge, bool) or not isinstance(merge, (int, float)) or not 0 < merge < 1:
        raise ValueError(f"merge must be a number in (0, 1), got {merge!r}")
    G = world.grid_size
    return g.check_int(2 * G if max_depth is None else max_depth, "max_depth", 1), 2 * G**2 + 1


def random_layout(grid_size: int, wall_fraction: float = 0.2, seed: int = 0, max_tries: int = 1000) -> np.ndarray:
    """A seeded random layout of round(wall_fraction * G^2) walls whose free cells all reach each other."""
    g.check_int(grid_size, "grid_size", 2, 16), g.check_int(seed, "seed"), g.check_int(max_tries, "max_tries", 1)
    number = isinstance(wall_fraction, (int, float, np.number)) and not isinstance(wall_fraction, bool)
    if not number or not 0 <= wall_fraction < 1 or grid_size**2 - round(wall_fraction * grid_size**2) < 2:
        raise ValueError(f"wall_fraction must be in [0, 1) and leave two free cells, got {wall_fraction}")
    rng, num_walls = np.random.default_rng(seed), int(round(wall_fraction * grid_size**2))
    for _ in range(max_tries):
        walls = np.isin(np.arange(grid_size**2), rng.choice(grid_size**2, size=num_walls, replace=False))
        if g.layouts_connected(walls := walls.reshape(1, grid_size, grid_size))[0]:
            return walls[0]
    raise RuntimeError(f"no connected layout with {num_walls} walls found in {max_tries} tries; lower wall_fraction")


def member(family: g.WorldFamily, k: int) -> g.World:
    """Layout k of a family as a World of its own (its states are cells 0..N-1)."""
    return g.World(family.grid_size, walls=family.layouts[k], image_size=family.image_size)


def nearest_cell_policy(model: g.JEPA, world: g.World) -> g.Policy:
    """Probe-free greedy planner: decode each imagined latent as the cell whose real latent is nearest (L2)."""
    emb, pos = g.encode_states(model, world).float(), torch.from_numpy(world.cell_pos(world.free_cells)).float()
    return g.latent_greedy_policy(model, world, lambda z: pos[torch.cdist(z.float(), emb).argmin(1).cpu()])


def shortest_distances(world: g.World, starts: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
    """BFS distance of each (start, goal) pair, -1 where unreachable: one BFS per distinct start, as run_mpc's."""
    unique, inverse = torch.unique(starts, return_inverse=True)
    return torch.from_numpy(world.shortest_paths(unique.numpy()))[inverse, goals]


step_budget = g.step_budget  # run_mpc's default steps for pairs with these BFS distances


def config_hash(cfg: g.Config) -> str:
    """The hash of a config's training fields that ends its default checkpoint name (g.default_out_path)."""
    return g.default_out_path(cfg).stem.rsplit("_", 1)[1]


@torch.no_grad()
def imagined_map_fidelity(model: g.JEPA, world: g.World, max_depth: int | None = None, merge: float = 0.5) -> dict:
    """How true the imagination search's maps are (privileged: an analysis for the reader, never for planning): from
    every free cell of ``world`` (each member of a WorldFamily on its own), imagine_map runs with imagination_policy's
    settings, and each imagined place is read as the free cell whose true frame's latent lies nearest it. Per depth
    d = 1..max_depth (default 2G, as the planner searches): "complete", the share of searches that imagine every cell
    within d moves at its true (BFS) distance; "no_phantom", the share with no place within d moves that is a cell
    found twice or at the wrong distance. Returns plain lists and the number of searches."""
    if not isinstance(world, g.World):
        raise TypeError(f"world must be a World or WorldFamily, got {type(world).__name__}")
    max_depth, max_nodes = search_settings(world, max_depth, merge)
    depths = np.arange(1, max_depth + 1)
    complete, clean = [], []
    was_training = model.training
    model.eval()  # as the planner runs it
    try:
        family = isinstance(world, g.WorldFamily)
        for single in (member(world, k) for k in range(len(world))) if family else [world]:
            free = torch.from_numpy(single.free_cells)
            frames = g.encode_states(model, single, free)  # the searches start from these, and are read by them
            found = g.imagine_map(model, frames, max_depth, max_nodes, merge)
            for u, cell in enumerate(free.tolist()):
                n = int(found["count"][u])
                place = free[torch.cdist(found["nodes"][u, :n], frames).argmin(1).cpu()].numpy()  # (n,) as cells
                depth, true = found["depth"][u, :n].cpu().numpy(), single.shortest_paths(cell)
                found_at_true = {int(c) for c, k in zip(place, depth) if true[c] == k}  # cells found at their distance
                complete.append([all(f in found_at_true for f in free.tolist() if true[f] <= d) for d in depths])
                right = true[place] == depth  # (n,) each place at its cell's true distance
                near = depth[None] <= depths[:, None]  # (D, n) the places within d moves
                clean.append([bool(right[m].all()) and len(set(place[m].tolist())) == int(m.sum()) for m in near])
    finally:
        model.train(was_training)
    return {
        "depth": depths.tolist(),
        "complete": np.mean(complete, 0).tolist(),
        "no_phantom": np.mean(clean, 0).tolist(),
        "searches": len(complete),
    }


def asked_once(policy: g.Policy) -> g.Policy:
    """A planner deciding from (image, goal image) alone, asked about each (cell, goal) pair once and its answer kept:
    runs with another memory or budget reuse every step they share."""
    answers = {}  # (cell, goal) -> the policy's dict for that pair, row by row

    def policy_once(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        pairs = list(zip(cells.tolist(), goals.tolist()))
        if todo := list(dict.fromkeys(p for p in pairs if p not in answers)):
            out = policy(*torch.tensor(todo).T)
            answers.update({p: {k: v[i] for k, v in out.items()} for i, p in enumerate(todo)})
        return {k: torch.stack([answers[p][k] for p in pairs]) for k in answers[pairs[0]]}

    return policy_once


def evaluate_unseen(model: g.JEPA, world: g.WorldFamily, num_layouts: int = 200, per_layout: int = 10) -> dict:
    """A layouts model in layouts it never saw (``num_layouts`` held-out, and on 5x5 the named ones): next-state
    accuracy; success and optimal share of imagination, the greedy probe, graph (privileged) and random, each alone
    and with each memory (_memory: remember_bumps, _tried: remember_tried), and of BFS, within run_mpc's step budget
    and (_3x) three times it. A 3x run plays its first budget's steps exactly as a run with the budget alone. The
    layouts study's rows; the command line's g.evaluate reports a few of these figures, with the same values."""
    g.calibrate_batchnorm(model, world)
    seen = g.WorldFamily(world.layouts[:200], image_size=world.image_size)
    probe = g.fit_probe(g.encode_states(model, seen).cpu().numpy(), seen.cell_pos(seen.free_cells))
    sets = {"heldout": (g.heldout_layouts(world.grid_size, num_layouts), per_layout)}
    if world.grid_size == 5:
        sets["named"] = (np.stack([g.layout_walls(name) for name in g.LAYOUTS]), 100)
    metrics = {"training_layouts_next_state_accuracy": g.next_state_accuracy(model, seen)}
    memories = {"": {}, "_memory": {"remember_bumps": True}, "_tried": {"remember_tried": True}}
    for name, (layouts, per) in sets.items():
        family = g.WorldFamily(layouts, image_size=world.image_size)
        N, acc = family.grid_size**2, g.layout_next_state_accuracy(model, family)
        starts, goals = g.sample_pairs(family, per, 0)
        metrics |= {f"{name}_next_state_accuracy": float(acc.mean()), f"{name}_pairs": len(starts)}
        metrics[f"{name}_layouts_all_right"] = float((acc == 1).mean())
        bfs = g.run_mpc(family, g.bfs_policy(family), starts, goals)  # the optimum, and each pair's BFS distance
        budget, optimal = step_budget(family, bfs.optimal_steps), bfs.optimal_steps
        # each planner built once, so every variant reads the same searches (imagine) and encodings (probe, graph);
        # graph is privileged (it encodes every free cell of a layout first): layout by layout, with its pairs' budget
        shared = {p: asked_once(g.make_policy(p, model, family, probe)) for p in ("imagine", "probe")}
        graphs = [(member(family, i), starts // N == i) for i in range(len(family))]
        graphs = [(m, asked_once(g.graph_policy(model, m)), k, step_budget(m, optimal[k])) for m, k in graphs]
        runs = {"bfs": [(bfs, budget)]}  # planner -> [(a run at 3x a budget, that budget)]
        for memory, flags in memories.items():
            for p in ("imagine", "probe", "random"):
                policy = shared.get(p) or g.random_policy()  # random: a fresh one, seeded as make_policy's
                runs[p + memory] = [(g.run_mpc(family, policy, starts, goals, 3 * budget, **flags), budget)]
            runs["graph" + memory] = [
                (g.run_mpc(m, policy, starts[k] - i * N, goals[k] - i * N, 3 * b, **flags), b)
                for i, (m, policy, k, b) in enumerate(graphs)
            ]
        for p, parts in runs.items():
            steps, best = (torch.cat([getattr(r, k) for r, _ in parts]) for k in ("steps", "optimal_steps"))
            for times, suffix in ((1, ""), (3, "_3x")):
                solved = torch.cat([r.steps <= times * b for r, b in parts])  # (P,) within times x the budget
                metrics[f"{name}_{p}{suffix}_success"] = float(solved.float().mean())
                metrics[f"{name}_{p}{suffix}_optimal"] = float((solved & (steps == best)).float().mean())
    return metrics


def estimate_train_time(cfg: g.Config, device=None, timed_steps: int = 5, world: g.World | None = None) -> dict:
    """How long g.train(cfg) takes here: one step's FLOPs, ``timed_steps`` timed steps after warm-up ones (timed
    apart: with cfg.compile they include the compilation), and the painting of the frames (bench/gpu_check.py,
    bench/gpu_layouts.py, the readers study). The model is prepared as train() prepares it: channels_last on CUDA,
    through torch.compile when cfg.compile."""
    from torch.utils.flop_counter import FlopCounterMode

    g.validate_config(cfg), g.check_int(timed_steps, "timed_steps", 1)
    device, gen = torch.device(device or g.default_device()), torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    world = world or g.build_world(cfg)
    data = g.make_transitions(world, max(4 * cfg.batch_size, 256), cfg.seq_len, seed=cfg.data_seed)
    model = g.JEPA(cfg, world.image_size).to(device)
    if device.type == "cuda":
        model, torch.backends.cuda.matmul.allow_tf32 = model.to(memory_format=torch.channels_last), True
    sigreg, opt = g.SIGReg(cfg.sigreg_dirs, seed=cfg.seed).to(device), g.make_optimizer(model, cfg)
    world.render(data.states[:1], device)  # a first call cuts the sprite sheet: not part of painting
    t0 = time.perf_counter()
    painted = g.paint_frames(world, data, device, size=cfg.input_size, crop=cfg.crop)  # train() paints them once
    sync()
    share = cfg.num_transitions * cfg.seq_len / data.states.numel()  # the full dataset's frames over these
    paint_seconds = (time.perf_counter() - t0) * share if painted is not None else 0.0
    draw = lambda: torch.randint(len(data), (cfg.batch_size,), generator=gen)
    obs, actions = g.sample_batch(world, data, draw(), device, painted)
    with FlopCounterMode(display=False) as counter:  # on the eager model: the same arithmetic
        g.jepa_loss(model, sigreg, obs, actions, cfg, 0)["loss"].backward()
    mode = "reduce-overhead" if device.type == "cuda" else None  # as train(): CUDA graphs on a GPU
    step_model = torch.compile(model, mode=mode) if cfg.compile else model
    warmup = 3 if cfg.compile else 1  # compiled: compiling, then (CUDA graphs) recording before replaying
    t0 = time.perf_counter()
    for step in range(warmup):  # allocations, kernel selection, compilation
        g.train_step(step_model, sigreg, opt, obs, actions, cfg, step, measure=False)
    sync()
    warmup_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()  # drawing the batch is part of a step
    for step in range(timed_steps):
        batch = g.sample_batch(world, data, draw(), device, painted)
        g.train_step(step_model, sigreg, opt, *batch, cfg, step, measure=False)
    sync()
    per_step = (time.perf_counter() - t0) / timed_steps
    est = {"flops_per_step": int(counter.get_total_flops()), "seconds_per_step": per_step, "steps": cfg.num_steps}
    total = per_step * cfg.num_steps + paint_seconds + (warmup_seconds if cfg.compile else 0.0)
    est |= {"warmup_steps": warmup, "warmup_seconds": warmup_seconds, "compiled": cfg.compile}
    return est | {"paint_seconds": paint_seconds, "total_seconds": total, "device": str(device)}


def format_estimate(est: dict, cfg: g.Config) -> str:
    """One line for estimate_train_time's result."""
    total, gflop, ms = est["total_seconds"], est["flops_per_step"] / 1e9, est["seconds_per_step"] * 1e3
    when = f"{total:.0f} s" if total < 120 else f"{total / 60:.1f} min" if total < 7200 else f"{total / 3600:.1f} h"
    head = f"profile {cfg.profile}: {gflop:.1f} GFLOP per step, {ms:.0f} ms per step on {est['device']}"
    return f"{head} -> {est['steps']:,} steps ~ {when} (plus evaluations)"
