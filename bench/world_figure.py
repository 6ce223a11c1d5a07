"""Draw assets/world.png, the README's picture: all 25 states of the open world as the model sees them, and the
u_trap layout (rendered image and top-down map with a shortest path). Run: python bench/world_figure.py"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gridjepa_utils as g


def main(out: Path = g.REPO_ROOT / "assets" / "world.png") -> Path:
    world = g.World(5)
    images = world.render(torch.arange(world.num_cells))[:, 0].numpy()  # (25, 128, 128)
    mosaic = images.reshape(5, 5, 128, 128).transpose(0, 2, 1, 3).reshape(5 * 128, 5 * 128)
    trap = g.World(5, walls="u_trap")
    start, goal = trap.cell_index(2, 2), trap.cell_index(2, 0)  # inside the U; the goal just beyond its wall
    dist = trap.shortest_paths(goal)
    path = [start]  # walk down the BFS distance to the goal
    while path[-1] != goal:
        path.append(min(trap.next_cell[path[-1]].tolist(), key=lambda c: dist[c]))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.15, 1, 1]})
    axes[0].imshow(mosaic, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("all 25 states of the open world")
    axes[1].imshow(trap.render(torch.tensor(int(start)))[0].numpy(), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("the u_trap layout, as the model sees it")
    for ax in axes[:2]:
        ax.axis("off")
    g.show_grid(trap, axes[2], path=path, goal=goal, title=f"u_trap: the shortest path, {len(path) - 1} steps")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    return out


if __name__ == "__main__":
    print(main())
