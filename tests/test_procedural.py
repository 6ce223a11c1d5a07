"""Procedurally generated layouts, the held-out set, the on-demand painter, and planning from two images
(notebook 05's "a world it has never seen")."""

import numpy as np
import pytest
import torch

import gridjepa_utils as gj


def keys(layouts):
    return {w.tobytes() for w in np.asarray(layouts, dtype=bool)}


# ── the generator and the held-out set ──


@pytest.mark.parametrize("grid_size", [5, 8])
def test_no_heldout_or_named_layout_is_ever_trained_on(grid_size):
    """The training stream never yields one of the reserved held-out layouts, nor a named layout: checked on
    every reserved test mask against 5,000 training layouts (5x5) / 2,000 (8x8)."""
    train = gj.procedural_layouts(grid_size, 5000 if grid_size == 5 else 2000, split="train", seed=0)
    heldout = gj.heldout_layouts(grid_size, gj.HELDOUT_RESERVED)
    assert len(keys(heldout)) == gj.HELDOUT_RESERVED  # distinct
    assert not keys(train) & keys(heldout)
    if grid_size == 5:
        named = [gj.layout_walls(name) for name in gj.LAYOUTS]
        assert not keys(train) & keys(named)
        assert not keys(heldout) & keys(named)


def test_procedural_layouts_are_valid_distinct_and_seeded():
    """Every layout connected, with 1..N/2 walls; distinct within a set; same seed -> same set, other seed -> other."""
    a = gj.procedural_layouts(5, 300, seed=3)
    assert a.shape == (300, 5, 5) and a.dtype == bool
    assert len(keys(a)) == 300
    walls = a.reshape(300, -1).sum(1)
    assert walls.min() >= 1 and walls.max() <= 12
    for w in a[:50]:
        gj.World(5, walls=w)  # raises if some free cell is unreachable
    assert np.array_equal(a, gj.procedural_layouts(5, 300, seed=3))
    assert not np.array_equal(a, gj.procedural_layouts(5, 300, seed=4))
    assert np.array_equal(gj.heldout_layouts(5, 10), gj.heldout_layouts(5, 200)[:10])


def test_generator_makes_every_kind_of_layout():
    """The mix holds scattered blocks and long walls (a row or column walled over >= 3 cells in a line)."""
    a = gj.procedural_layouts(8, 400, seed=0)
    longest = [max(max(np.diff(np.flatnonzero(np.r_[0, r, 0] == 0)) - 1) for r in np.r_[w, w.T]) for w in a]
    assert np.mean(np.array(longest) >= 3) > 0.3
    assert np.mean(np.array(longest) <= 2) > 0.1


def test_layouts_connected_matches_bfs():
    """The vectorised flood fill agrees with World's BFS check on 500 random wall sets."""
    rng = np.random.default_rng(0)
    walls = rng.random((500, 5, 5)) < 0.3
    fast = gj.layouts_connected(walls)
    for w, ok in zip(walls, fast):
        world = gj.World(5, walls=w, check_connected=False)
        free = world.free_cells
        assert ok == bool(len(free) and (world.bfs_from(free[0])[free] >= 0).all())


@pytest.mark.parametrize("bad", [dict(split="valid"), dict(num=0), dict(grid_size=2), dict(num=1.5)])
def test_procedural_layouts_bad_arguments(bad):
    args = dict(grid_size=5, num=10, split="train") | bad
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        gj.procedural_layouts(**args)


def test_heldout_limit():
    with pytest.raises(ValueError, match="num"):
        gj.heldout_layouts(5, gj.HELDOUT_RESERVED + 1)


# ── the painter: any layout on demand, bit-identical to the atlas ──


@pytest.mark.parametrize("grid_size", [5, 8])
def test_painter_equals_atlas(grid_size):
    """Painting (walls, agent cell) on demand gives exactly the atlas' pixels, for named and random layouts."""
    layouts = list(gj.procedural_layouts(grid_size, 3, split="test"))
    if grid_size == 5:
        layouts += [gj.layout_walls(n) for n in ("open", "maze", "u_trap")]
    family = gj.WorldFamily(layouts)
    N = grid_size**2
    for k, walls in enumerate(layouts):
        world = gj.World(grid_size, walls=walls)
        cells = torch.from_numpy(world.free_cells)
        assert torch.equal(family.render(cells + k * N), world.render(cells))


def test_family_of_many_layouts_trains_and_monitors():
    """A family of 5,000 layouts (no atlas) trains a smoke model; the curve's accuracy is within layouts."""
    family = gj.WorldFamily(gj.procedural_layouts(5, 5000))
    cfg = gj.make_config("smoke", num_steps=4, eval_every=4)
    result = gj.train(cfg, world=family, progress=False)
    assert 0 <= result.history["next_state_acc"][-1] <= 1
    acc = gj.layout_next_state_accuracy(result.model, gj.WorldFamily(family.layouts[:3]))
    ref = [gj.next_state_accuracy(result.model, gj.World(5, walls=w)) for w in family.layouts[:3]]
    np.testing.assert_allclose(acc, ref, atol=1e-6)
