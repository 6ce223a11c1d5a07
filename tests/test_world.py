"""The world's rules, layouts, rendering and datasets (notebook 01)."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gridjepa_utils as gj

sys.path.insert(0, str(Path(gj.__file__).resolve().parent / "bench"))
import lab  # noqa: E402  (study-only code: bench/lab.py)

UP, DOWN, LEFT, RIGHT = range(4)


def all_cell_action_pairs(world):
    """Every (free cell, action) pair as two (P,) long tensors."""
    cells = torch.from_numpy(world.free_cells).repeat_interleave(4)
    actions = torch.arange(4).repeat(len(world.free_cells))
    return cells, actions


# ── dynamics ──


def test_action_deltas_match_names():
    """up/down change the row, left/right the column, each by one in the named direction."""
    assert gj.ACTIONS == ("up", "down", "left", "right")
    assert gj.ACTION_DELTAS[UP] == (0, -1)
    assert gj.ACTION_DELTAS[DOWN] == (0, 1)
    assert gj.ACTION_DELTAS[LEFT] == (-1, 0)
    assert gj.ACTION_DELTAS[RIGHT] == (1, 0)


def test_open_grid_every_wall_case_stays(open_world):
    """On the open 5x5, each border cell x each action that leaves the board keeps the agent in place."""
    G = 5
    cases = []
    for col, row in itertools.product(range(G), range(G)):
        if row == 0:
            cases.append((col, row, UP))
        if row == G - 1:
            cases.append((col, row, DOWN))
        if col == 0:
            cases.append((col, row, LEFT))
        if col == G - 1:
            cases.append((col, row, RIGHT))
    assert len(cases) == 20  # 4 sides x 5 cells (corners count twice)
    cells = torch.tensor([open_world.cell_index(c, r) for c, r, _ in cases])
    actions = torch.tensor([a for _, _, a in cases])
    assert torch.equal(open_world.step(cells, actions), cells)


def test_open_grid_interior_moves_change_one_coordinate_by_one(open_world):
    """Every move that stays on the board changes exactly one coordinate by 1, in the action's direction."""
    cells, actions = all_cell_action_pairs(open_world)
    after = open_world.step(cells, actions)
    before_pos, after_pos = open_world.cell_pos(cells.numpy()), open_world.cell_pos(after.numpy())
    moved = 0
    for b, a, act in zip(before_pos, after_pos, actions.tolist()):
        target = b + np.array(gj.ACTION_DELTAS[act])
        if ((0 <= target) & (target < 5)).all():
            assert (a == target).all(), (b, act, a)
            assert np.abs(a - b).sum() == 1
            moved += 1
        else:
            assert (a == b).all()
    assert moved == 80  # 100 (cell, action) pairs minus the 20 wall cases


@pytest.mark.parametrize("name", sorted(gj.LAYOUTS))
def test_move_into_wall_cell_stays(name):
    """In every named layout, a move into a wall cell (or off the board) stays put; any other move goes."""
    world = gj.World(5, walls=name)
    cells, actions = all_cell_action_pairs(world)
    after = world.step(cells, actions)
    for cell, act, nxt in zip(cells.tolist(), actions.tolist(), after.tolist()):
        col, row = cell % 5, cell // 5
        dc, dr = gj.ACTION_DELTAS[act]
        c, r = col + dc, row + dr
        blocked = not (0 <= c < 5 and 0 <= r < 5) or world.walls[r, c]
        assert nxt == (cell if blocked else r * 5 + c), (name, (col, row), gj.ACTIONS[act])
        assert not world.is_wall(nxt)
    if name != "open":
        # the layout really has wall bumps beyond the border ones
        interior_bumps = sum(
            1
            for cell, act in zip(cells.tolist(), actions.tolist())
            if 0 <= cell % 5 + gj.ACTION_DELTAS[act][0] < 5
            and 0 <= cell // 5 + gj.ACTION_DELTAS[act][1] < 5
            and world.walls[cell // 5 + gj.ACTION_DELTAS[act][1], cell % 5 + gj.ACTION_DELTAS[act][0]]
        )
        assert interior_bumps > 0


@pytest.mark.parametrize("name", sorted(gj.LAYOUTS))
def test_named_layouts_are_connected(name):
    """Every named layout: all free cells reach each other (BFS distances >= 0), walls are never entered."""
    world = gj.World(5, walls=name)
    dist = world.shortest_paths()
    free = world.free_cells
    assert (dist[np.ix_(free, free)] >= 0).all()
    walls = np.flatnonzero(world.walls.reshape(-1))
    assert (dist[np.ix_(free, walls)] == -1).all()
    assert world.walls.sum() == sum(row.count("#") for row in gj.LAYOUTS[name])


def test_layout_rows_read_top_to_bottom():
    """The layout strings are rows top to bottom, indexed [row, col]: u_trap's cup centre (2, 2) is free."""
    walls = gj.layout_walls("u_trap")
    assert walls[1, 1] and walls[1, 2] and walls[1, 3] and walls[2, 1] and walls[2, 3]
    assert not walls[2, 2]
    world = gj.World(5, walls="u_trap")
    assert world.is_wall(world.cell_index(1, 2)) and not world.is_wall(world.cell_index(2, 2))


# ── rendering ──


@pytest.mark.parametrize("grid_size", range(3, 13))
def test_grid_sizes_construct_and_render_distinct_images(grid_size):
    """Grids 3..12 build, render one uint8 image per cell, and no two free cells look the same."""
    world = gj.World(grid_size)
    atlas = world.atlas()
    assert atlas.shape == (grid_size**2, 128, 128) and atlas.dtype == torch.uint8
    flat = atlas[torch.from_numpy(world.free_cells)].flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(world.free_cells)
    obs = world.render_pos(grid_size - 1, grid_size - 1)
    assert obs.shape == (1, 1, 128, 128) and obs.dtype == torch.float32
    assert 0.0 <= float(obs.min()) and float(obs.max()) <= 1.0


def test_rendering_is_deterministic():
    """Two World instances render bit-identical atlases (the images are a function of the layout only)."""
    for walls in (None, "u_trap"):
        a, b = gj.World(5, walls=walls).atlas(), gj.World(5, walls=walls).atlas()
        assert torch.equal(a, b)
    assert not torch.equal(gj.World(5).atlas(), gj.World(5, walls="u_trap").atlas())


@pytest.mark.parametrize("grid_size", [2, 5, 8, 16])
def test_painting_equals_pasting_each_sprite_over_the_whole_image(grid_size):
    """SpriteSheet.paint (one scatter per sprite, into the crop that sprites reach) paints exactly what pasting each
    sprite's box over the full supersampled board, back to front, then averaging each 2x2 block would paint."""
    sheet, N = gj.SpriteSheet(grid_size), grid_size**2
    gen = torch.Generator().manual_seed(grid_size)
    walls, cells, targets = torch.rand(64, N, generator=gen) < 0.3, *torch.randint(N, (2, 64), generator=gen)
    for goal in (None, targets):
        img = sheet.board.expand(64, *sheet.board.shape).clone()
        for kind, cell, (ys, xs), value, mask in sheet.sprites:
            drawn = walls[:, cell] if kind == 0 else (cells == cell) & ~walls[torch.arange(64), cells]
            drawn = drawn if kind < 2 else goal == cell if goal is not None else torch.zeros(64, dtype=torch.bool)
            img[drawn, ys, xs] = torch.where(mask, value, img[drawn, ys, xs])
        pasted = torch.round(torch.nn.functional.avg_pool2d(img[:, None], 2)[:, 0].clamp(0, 1) * 255).to(torch.uint8)
        painted = sheet.paint(walls, cells, goal).int()
        assert (painted - pasted.int()).abs().max() <= 1  # avg_pool2d sums the four pixels in another order
        assert (painted != pasted).float().mean() < 1e-3


def test_open_grid_images_pairwise_distinct(open_world):
    """The 25 cell images of the open grid are pairwise different, by far more than a few pixels."""
    atlas = open_world.atlas()
    assert atlas.shape[0] == 25
    differing = (atlas[:, None] != atlas[None]).flatten(2).sum(-1)  # (25, 25) pixels that differ
    differing.fill_diagonal_(10**9)
    assert int(differing.min()) > 100


def test_render_matches_render_pos_and_atlas(open_world):
    """render(states) is the atlas scaled to [0, 1], with a channel axis; render_pos is the same image."""
    states = torch.tensor([[0, 7], [24, 12]])
    obs = open_world.render(states)
    assert obs.shape == (2, 2, 1, 128, 128)
    assert torch.allclose(obs[1, 0, 0] * 255, open_world.atlas()[24].float(), atol=1e-3)
    assert torch.equal(open_world.render_pos(2, 1), open_world.render(torch.tensor([7])))


# ── datasets ──


def test_make_transitions_seeded(open_world):
    """Same seed -> identical tensors; different seed -> different ones."""
    a = gj.make_transitions(open_world, 2000, seq_len=3, seed=5)
    b = gj.make_transitions(open_world, 2000, seq_len=3, seed=5)
    c = gj.make_transitions(open_world, 2000, seq_len=3, seed=6)
    assert torch.equal(a.states, b.states) and torch.equal(a.actions, b.actions)
    assert not torch.equal(a.states, c.states)
    assert not torch.equal(a.actions, c.actions)


@pytest.mark.parametrize("name", sorted(gj.LAYOUTS))
def test_transitions_follow_the_world(name):
    """Each stored trajectory is consistent with World.step, starts on a free cell, and has the asked shape."""
    world = gj.World(5, walls=name)
    data = gj.make_transitions(world, 500, seq_len=4, seed=1)
    assert data.states.shape == (500, 4) and data.actions.shape == (500, 3)
    states, actions = data.states.long(), data.actions.long()
    for t in range(3):
        assert torch.equal(world.step(states[:, t], actions[:, t]), states[:, t + 1])
    assert not world.walls.reshape(-1)[states.numpy()].any()


def test_fifty_thousand_transitions_fit_in_ten_megabytes(open_world):
    """50,000 transitions are stored as small integers: <= 10 MB (in fact 250 kB)."""
    data = gj.make_transitions(open_world, 50_000)
    assert len(data) == 50_000
    states, actions = data.states, data.actions
    assert data.nbytes == states.element_size() * states.numel() + actions.element_size() * actions.numel()
    assert data.nbytes <= 10 * 2**20
    assert data.states.dtype == torch.int16 and data.actions.dtype == torch.uint8


def wall_hit_share(data):
    """The share of a dataset's moves that leave the state as it was: the blocked ones."""
    return float((data.states[:, 1:] == data.states[:, :-1]).float().mean())


def test_transitions_are_balanced_on_the_open_grid(open_world):
    """Actions and start cells are balanced (each within 0.01 of its uniform share); the wall-hit share is
    20/100 = 0.20 +- 0.01.

    On the open 5x5 with uniform cells and actions, 20 of the 100 (cell, action) pairs leave the board.
    With 50,000 samples the share's standard error is sqrt(0.2 * 0.8 / 50000) = 0.0018, so +-0.01 is ~5 sigma.
    """
    data = gj.make_transitions(open_world, 50_000, seed=0)
    assert len(data) == 50_000
    assert np.all(np.abs(torch.bincount(data.actions.long().reshape(-1), minlength=4).numpy() / 50_000 - 0.25) < 0.01)
    assert np.all(np.abs(torch.bincount(data.states[:, 0].long(), minlength=25).numpy() / 50_000 - 0.04) < 0.01)
    assert abs(wall_hit_share(data) - 0.20) < 0.01


@pytest.mark.parametrize("name", ["two_rooms", "u_trap", "maze"])
def test_dataset_wall_hit_share_matches_the_layout(name):
    """The wall-hit share matches the exact share of blocked (free cell, action) pairs of the layout (+-0.015); no
    state puts the agent on a wall."""
    world, data = gj.World(5, walls=name), gj.make_transitions(gj.World(5, walls=name), 20_000, seed=3)
    free = torch.from_numpy(world.free_cells)
    expected = float((world.next_cell[free] == free[:, None]).float().mean())
    assert abs(wall_hit_share(data) - expected) < 0.015
    assert not world.walls.reshape(-1)[data.states.long().numpy()].any()


def test_exclude_cells_never_appear(open_world):
    """Cells passed as exclude_cells appear in no frame of any trajectory (not even as a wall bump)."""
    excluded = (12, 0)
    data = gj.make_transitions(open_world, 3000, seq_len=5, seed=2, exclude_cells=excluded)
    assert len(data) == 3000
    for cell in excluded:
        assert not (data.states.long() == cell).any()
    # and the rest of the grid is still visited
    visited = set(torch.unique(data.states.long()).tolist())
    assert visited == set(range(25)) - set(excluded)


def test_show_target_target_never_moves():
    """With show_target, state = agent + N * target; the target is constant within each trajectory."""
    world = gj.World(5, walls="two_rooms", show_target=True)
    assert world.num_states == 625
    data = gj.make_transitions(world, 2000, seq_len=6, seed=4)
    states = data.states.long()
    target, agent = states // 25, states % 25
    assert (target == target[:, :1]).all()
    assert len(torch.unique(target[:, 0])) == len(world.free_cells)  # targets spread over every free cell
    assert not world.walls.reshape(-1)[target.numpy()].any()
    assert not world.walls.reshape(-1)[agent.numpy()].any()
    # stepping keeps the target
    after = world.step(states[:, 0], data.actions[:, 0].long())
    assert torch.equal(after // 25, target[:, 0])
    assert torch.equal(after, states[:, 1])
    # the target is drawn: the same agent cell with two targets renders differently
    assert not torch.equal(world.render_pos(0, 0, target=(4, 4)), world.render_pos(0, 0, target=(3, 4)))


@pytest.mark.parametrize("grid_size,seed", [(5, 0), (7, 1), (10, 2)])
def test_random_layout_connected_and_seeded(grid_size, seed):
    """random_layout: the asked number of walls, all free cells connected, same seed -> same layout."""
    walls = lab.random_layout(grid_size, wall_fraction=0.25, seed=seed)
    assert walls.shape == (grid_size, grid_size) and walls.dtype == bool
    assert walls.sum() == round(0.25 * grid_size**2)
    world = gj.World(grid_size, walls=walls)  # check_connected=True raises otherwise
    dist = world.shortest_paths()
    assert (dist[np.ix_(world.free_cells, world.free_cells)] >= 0).all()
    assert np.array_equal(walls, lab.random_layout(grid_size, wall_fraction=0.25, seed=seed))
    others = [lab.random_layout(grid_size, wall_fraction=0.25, seed=s) for s in range(seed + 1, seed + 4)]
    assert any(not np.array_equal(walls, o) for o in others)


def test_all_pairs_open_grid(open_world):
    """all_pairs: 600 ordered pairs of distinct cells on the open 5x5, each exactly once."""
    starts, goals = open_world.all_pairs()
    assert len(starts) == len(goals) == 600
    assert not (starts == goals).any()
    assert len(set(zip(starts.tolist(), goals.tolist()))) == 600


def test_all_pairs_skip_walls():
    """all_pairs on a layout uses free cells only: F * (F - 1) pairs."""
    world = gj.World(5, walls="maze")
    starts, goals = world.all_pairs()
    F = len(world.free_cells)
    assert len(starts) == F * (F - 1)
    assert not world.walls.reshape(-1)[torch.cat([starts, goals]).numpy()].any()


def test_shortest_paths_open_grid_are_manhattan(open_world):
    """On the open grid the BFS distances are symmetric and equal the Manhattan distance."""
    dist = open_world.shortest_paths()
    assert np.array_equal(dist, dist.T)
    pos = open_world.cell_pos(np.arange(25))
    manhattan = np.abs(pos[:, None] - pos[None]).sum(-1)
    assert np.array_equal(dist, manhattan)


def test_world_family_stacks_layouts():
    """A WorldFamily's state k*N + cell behaves as that cell of layout k: same image, same moves, walls respected."""
    layouts = [lab.random_layout(5, 0.2, seed=s) for s in range(3)]
    family = gj.WorldFamily(layouts)
    members = [gj.World(5, walls=w) for w in layouts]
    N = 25
    assert family.num_states == 3 * N
    assert len(family.free_cells) == sum(len(m.free_cells) for m in members)
    for k, m in enumerate(members):
        cells = torch.from_numpy(m.free_cells)
        assert torch.equal(family.render(cells + k * N), m.render(cells))
        for a in range(4):
            acts = torch.full_like(cells, a)
            assert torch.equal(family.step(cells + k * N, acts), m.step(cells, acts) + k * N)
    data = gj.make_transitions(family, 2000, seed=0)
    layout_of = data.states.long() // N
    assert (layout_of[:, 0] == layout_of[:, 1]).all()  # a transition never jumps between layouts
    assert len(torch.unique(layout_of)) == 3


def test_world_family_refuses_mixed_sizes():
    with pytest.raises(ValueError, match="same grid size"):
        gj.WorldFamily([np.zeros((5, 5), bool), np.zeros((6, 6), bool)])
