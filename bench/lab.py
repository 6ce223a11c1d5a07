"""Helpers only the studies in bench/ call: moved out of gridjepa_utils.py, which holds what the notebooks and the
main job use. Each section names the part of the module it builds on."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gridjepa_utils as g  # noqa: E402

# Part A moves nothing to bench/lab.py: every name of "settings" and "1. world & data" is used by the module,
# a notebook or a test.


"""Study-only code from part B (2. model, 3. training): none - every function of that part is used by the module,
a notebook or the tests through gridjepa_utils."""


def imagination_settings() -> dict:
    """imagination_policy's merge radius and meeting rule as defaults, recorded beside a figure planned with it."""
    import inspect

    defaults = inspect.signature(g.imagination_policy).parameters
    return {f"imagine_{k}": defaults[k].default for k in ("merge", "meet")}


@torch.no_grad()
def unseen_layout_report(
    model: g.JEPA, layouts, per_layout=10, planners=("imagine", "graph", "random"), probe=None, seed=0
) -> dict:
    """A model in layouts (K, G, G), e.g. held-out ones: next-state accuracy over every (free cell, action) of each
    layout, and each planner's share of ``per_layout`` seeded pairs per layout solved (and optimal). "imagine_memory"
    and "imagine_tried" are the imagination planner with run_mpc's memories; "graph" is privileged, built layout by
    layout from every free cell's image; "probe" needs a ``probe`` fitted elsewhere (on training layouts)."""
    family = g.WorldFamily(layouts, image_size=model.encoder.image_size)
    N, acc = family.grid_size**2, g.layout_next_state_accuracy(model, family)
    starts, goals = g.sample_pairs(family, per_layout, seed)
    report = {"layouts": len(family), "pairs": len(starts), "next_state_accuracy": float(acc.mean())}
    report["layouts_all_transitions_right"] = float((acc == 1).mean())
    report["next_state_accuracy_per_layout"] = [round(float(a), 4) for a in acc]
    # one policy per planner, whatever its memory: the imagination planner's searches (one per image) serve all three
    policies = {"probe": g.probe_policy(model, family, probe)} if probe is not None else {}
    for name in planners:
        if name == "graph":
            runs = []
            for k, member in enumerate(family.members):
                mine = (starts // N) == k
                runs.append(g.run_mpc(member, g.graph_policy(model, member), starts[mine] - k * N, goals[mine] - k * N))
            shares = {
                key: float(torch.cat([getattr(r, key) for r in runs]).float().mean()) for key in ("success", "optimal")
            }
            report[name] = shares | {"seconds": sum(r.seconds for r in runs)}
            continue
        base = name.removesuffix("_memory").removesuffix("_tried")
        if base == "probe" and probe is None:
            raise ValueError("the probe planner needs probe= (fitted on training layouts, never on these)")
        if base not in policies:
            policies[base] = g.make_policy(base, model, family)
        memory = {"remember_bumps": name.endswith("_memory"), "remember_tried": name.endswith("_tried")}
        summary = g.run_mpc(family, policies[base], starts, goals, **memory).summary()
        report[name] = {k: summary[k] for k in ("success", "optimal", "seconds")}
    return report


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
    max_depth, max_nodes = g._search_settings(world, max_depth, merge)
    depths = np.arange(1, max_depth + 1)
    complete, clean = [], []
    was_training = model.training
    model.eval()  # as the planner runs it
    try:
        for member in world.members if isinstance(world, g.WorldFamily) else [world]:
            free = torch.from_numpy(member.free_cells)
            frames = g.encode_cells(model, member, free)  # the searches start from these, and are read by them
            found = g.imagine_map(model, frames, max_depth, max_nodes, merge)
            for u, cell in enumerate(free.tolist()):
                n = int(found["count"][u])
                place = free[torch.cdist(found["nodes"][u, :n], frames).argmin(1).cpu()].numpy()  # (n,) as cells
                depth, true = found["depth"][u, :n].cpu().numpy(), member.bfs_from(cell)
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
