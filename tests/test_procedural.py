"""Procedurally generated layouts, the held-out set, the on-demand painter, and planning from two images
(notebook 05's "a world it has never seen")."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

import gridjepa_utils as gj

sys.path.insert(0, str(gj.REPO_ROOT / "bench"))
import lab  # noqa: E402  (study-only code: bench/lab.py)


def keys(layouts):
    return {w.tobytes() for w in np.asarray(layouts, dtype=bool)}


# ── the generator and the held-out set ──


def images(layouts):
    """The 8 images of each layout (K, G, G) under the square's symmetries: (8, K, G, G), the layouts first."""
    turns = [np.rot90(layouts, k, axes=(1, 2)) for k in range(4)]
    return np.stack(turns + [t.transpose(0, 2, 1) for t in turns])


@pytest.fixture(scope="module")
def recipe_layouts(studies):
    """Every training layout of the shipped layouts recipes, drawn once as build_world draws them: the 5x5 `layouts`
    profile's and the 8x8 recipe's of the layouts study (its count of layouts, 50,000 each, and data seed)."""
    recipes = {5: gj.make_config("layouts"), 8: studies.layouts_config("layouts", 8, 0)}
    return {G: gj.procedural_layouts(G, cfg.num_layouts, seed=cfg.data_seed) for G, cfg in recipes.items()}


@pytest.mark.slow
@pytest.mark.parametrize("grid_size", [5, 8])
def test_no_reserved_or_named_layout_is_trained_on_turned_or_mirrored(recipe_layouts, grid_size):
    """No training layout of a shipped recipe (every one) is, in any of its 8 images (4 turns, each mirrored or
    not), one of the reserved layouts - the 200 held-out ones evaluate_unseen reports, the validation ones, all 1,000
    - nor a named layout. The reserved stream holds one layout per class: no two of its layouts share an image."""
    train, reserved = recipe_layouts[grid_size], gj.heldout_layouts(grid_size, gj.HELDOUT_RESERVED)
    assert len(keys(train)) == len(train)  # distinct, exactly
    named = [gj.layout_walls(name) for name in gj.LAYOUTS] if grid_size == 5 else []
    banned = keys(reserved) | keys(named)
    assert len(banned) == gj.HELDOUT_RESERVED + len(named)
    assert keys(lab.validation_layouts(grid_size, 500)) <= keys(reserved)
    for image in images(train):  # (K, G, G) one image of every training layout
        assert not keys(image) & banned
    owner = {}  # image -> the reserved or named layout it is an image of
    for k, walls in enumerate([*reserved, *named]):
        for image in images(walls[None]):
            assert owner.setdefault(image.tobytes(), k) == k


def test_layout_keys_name_a_class():
    """layout_keys: a layout, its turns and its mirror images share one key; a layout of another class gets another
    key; symmetric=False keys the layout itself."""
    walls = np.zeros((6, 6), dtype=bool)
    walls[0, 1:4] = walls[3, 2] = True  # no symmetry of the square maps it to itself
    same = [walls, np.rot90(walls), np.rot90(walls, 2), np.rot90(walls, 3), walls.T, walls[::-1], walls[:, ::-1]]
    assert len(keys(same)) == 7 and len(set(gj.layout_keys(np.stack(same)))) == 1
    assert len(set(gj.layout_keys(np.stack(same), symmetric=False))) == 7
    other = walls.copy()
    other[3, 2], other[4, 2] = False, True  # one wall moved: another class
    assert gj.layout_keys(other[None]) != gj.layout_keys(walls[None])
    drawn = np.random.default_rng(0).random((300, 5, 5)) < 0.3
    drawn = np.concatenate([drawn, np.rot90(drawn[:100], axes=(1, 2)), drawn[100:200, ::-1]])  # some classes twice
    classes = [frozenset(image.tobytes() for image in layout) for layout in images(drawn).swapaxes(0, 1)]
    found = gj.layout_keys(drawn)
    assert len(set(zip(classes, found))) == len(set(classes)) == len(set(found)) == 300  # one key per class


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
        assert ok == bool(len(free) and (world.shortest_paths(free[0])[free] >= 0).all())


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(num=0), dict(grid_size=2), dict(num=1.5)])
def test_procedural_layouts_bad_arguments(bad):
    args = dict(grid_size=5, num=10) | bad
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        gj.procedural_layouts(**args)


def test_heldout_limit():
    with pytest.raises(ValueError, match="num"):
        gj.heldout_layouts(5, gj.HELDOUT_RESERVED + 1)
    with pytest.raises(ValueError, match="num"):
        lab.validation_layouts(5, gj.HELDOUT_RESERVED)


def test_validation_layouts_are_neither_trained_on_nor_tested():
    """The layouts a planner's settings are chosen on: reserved (so never trained on), distinct from the 200 test
    layouts that evaluate_unseen reports, and the same on every call."""
    val, test = lab.validation_layouts(5), gj.heldout_layouts(5, 200)
    assert len(val) == 200 and not keys(val) & keys(test)
    assert keys(val) <= keys(gj.heldout_layouts(5, gj.HELDOUT_RESERVED))
    assert np.array_equal(val, lab.validation_layouts(5))


# ── the painter: any layout on demand, bit-identical to the atlas ──


@pytest.mark.parametrize("grid_size", [5, 8])
def test_painter_equals_atlas(grid_size):
    """Painting (walls, agent cell) on demand gives exactly the atlas' pixels, for named and random layouts."""
    layouts = list(gj.heldout_layouts(grid_size, 3))
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


def test_painted_frames_are_the_images_painted_on_demand(monkeypatch, capsys):
    """paint_frames paints each distinct state of a dataset once; a batch gathered from it is byte for byte the
    batch painted on demand. A single layout needs none (its atlas is one gather); above the memory limit it
    says so and training paints on demand."""
    family = gj.WorldFamily(gj.procedural_layouts(5, 300, seed=2))
    data = gj.make_transitions(family, 400, seq_len=3, seed=1)
    painted = gj.paint_frames(family, data, "cpu")
    assert painted[1].dtype == torch.uint8 and len(painted[1]) == len(torch.unique(data.states))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:50]
    obs, actions = gj.sample_batch(family, data, idx, "cpu")
    obs2, actions2 = gj.sample_batch(family, data, idx, "cpu", painted)
    assert obs.shape == (50, 3, 1, 128, 128) and torch.equal(obs, obs2) and torch.equal(actions, actions2)
    world = gj.World(5)
    assert gj.paint_frames(world, gj.make_transitions(world, 10), "cpu") is None
    with pytest.raises(ValueError, match="size must be a positive integer that divides the image size 128"):
        gj.paint_frames(family, data, "cpu", size=48)
    monkeypatch.setenv("GRIDJEPA_MEMORY_LIMIT_GB", "0.001")
    assert gj.paint_frames(family, data, "cpu") is None
    assert "painting on demand" in capsys.readouterr().out


def test_frames_painted_pooled_are_what_the_encoder_pools():
    """Painted for an encoder that pools 128 -> 32 first, the frames are stored pooled (float, 4x smaller than
    uint8): a batch gathered from them is exactly the on-demand batch average-pooled, and the encoder maps both to
    the same latents. An encoder refuses frames of any other size, naming both it takes."""
    family = gj.WorldFamily(gj.procedural_layouts(5, 300, seed=3))
    data = gj.make_transitions(family, 300, seq_len=3, seed=2)
    painted = gj.paint_frames(family, data, "cpu", size=32)
    assert painted[1].dtype == torch.float32 and painted[1].shape[1:] == (32, 32)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:40]
    obs, _ = gj.sample_batch(family, data, idx, "cpu")
    pooled, _ = gj.sample_batch(family, data, idx, "cpu", painted)
    assert pooled.shape == (40, 3, 1, 32, 32)
    assert torch.equal(pooled, torch.nn.functional.avg_pool2d(obs.flatten(0, 1), 4).view(40, 3, 1, 32, 32))
    assert gj.paint_frames(family, data, "cpu", size=128)[1].dtype == torch.uint8  # no pooling: bytes
    cfg = gj.make_config("smoke")
    torch.manual_seed(0)
    encoder = gj.JEPA(cfg).encoder.eval()
    with torch.no_grad():
        assert torch.equal(encoder(obs.flatten(0, 1)), encoder(pooled.flatten(0, 1)))
        with pytest.raises(ValueError, match=r"takes 128x128 images \(or frames already pooled to input_size 32"):
            encoder(torch.zeros(2, 1, 64, 64))


def test_frames_painted_cropped_keep_the_rows_a_cropping_encoder_reads():
    """For an encoder that crops to the middle half of the rows, the frames are stored with only those rows (half
    the memory): they are exactly the full pooled frames' middle rows, and the encoder maps both to the same
    latents, bit for bit - so a recipe's training does not change with the storage."""
    family = gj.WorldFamily(gj.procedural_layouts(8, 200, seed=5))
    data = gj.make_transitions(family, 200, seq_len=3, seed=3)
    full = gj.paint_frames(family, data, "cpu", size=64)
    cropped = gj.paint_frames(family, data, "cpu", size=64, crop=True)
    assert cropped[1].shape[1:] == (32, 64) and torch.equal(cropped[1], full[1][:, 16:48])
    assert torch.equal(
        gj.paint_frames(family, data, "cpu", crop=True)[1], gj.paint_frames(family, data, "cpu")[1][:, 32:96]
    )
    idx = torch.arange(30)
    obs, _ = gj.sample_batch(family, data, idx, "cpu", full)
    obs_cropped, _ = gj.sample_batch(family, data, idx, "cpu", cropped)
    cfg = gj.make_config("smoke", grid_size=8, input_size=64, patch_size=16, crop=True, pool="flat")
    torch.manual_seed(0)
    encoder = gj.JEPA(cfg, family.image_size).encoder.eval()
    with torch.no_grad():
        ref = encoder(obs.flatten(0, 1))
        assert torch.equal(ref, encoder(obs_cropped.flatten(0, 1)))


def test_training_on_painted_frames_takes_the_same_steps():
    """train() on a layout family gathers from frames painted once: its weights after 3 steps equal those of
    the same 3 steps with every batch painted on demand."""
    family = gj.WorldFamily(gj.procedural_layouts(5, 400, seed=4))
    cfg = gj.make_config("smoke", num_steps=3, eval_every=3, idm_weight=1.0, num_layouts=400)
    data = gj.make_transitions(family, 500, seed=0)
    ref = gj.train(cfg, world=family, data=data, progress=False, device="cpu")
    torch.manual_seed(cfg.seed)
    model = gj.JEPA(cfg, family.image_size)
    sigreg = gj.SIGReg(cfg.sigreg_dirs, seed=cfg.seed)
    opt = gj.make_optimizer(model, cfg)
    for step in range(3):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        obs, actions = gj.sample_batch(family, data, idx, "cpu")  # painted on demand
        gj.train_step(model, sigreg, opt, obs, actions, cfg, step)
    ref_params = dict(ref.model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=0, msg=name)


def test_estimate_counts_painting_a_family_once():
    """For a layout family the estimate adds the one-off painting of the dataset's frames to the steps."""
    family = gj.WorldFamily(gj.procedural_layouts(5, 200, seed=5))
    cfg = gj.make_config("smoke", num_layouts=200, num_transitions=2000)
    est = lab.estimate_train_time(cfg, "cpu", timed_steps=2, world=family)
    assert est["paint_seconds"] > 0
    assert est["total_seconds"] == pytest.approx(est["seconds_per_step"] * cfg.num_steps + est["paint_seconds"])


# ── planning from two images: imagination search ──


class OracleModel(torch.nn.Module):
    """A perfect world model of one layout: the latent is the one-hot cell (found by matching the exact image),
    the prediction the true next cell's one-hot. Lets a test check a planner's logic with no model error."""

    def __init__(self, world):
        super().__init__()
        self.world, self.dummy = world, torch.nn.Parameter(torch.zeros(1))
        self.atlas = world.atlas().float() / 255

    @property
    def device(self):
        return torch.device("cpu")

    def encode(self, obs):
        match = (obs[:, 0, None] == self.atlas[None]).flatten(2).all(-1)  # (B, N)
        return torch.nn.functional.one_hot(match.float().argmax(1), self.world.num_cells).float()

    def predict(self, emb, action):
        return torch.nn.functional.one_hot(self.world.next_cell[emb.argmax(1), action], self.world.num_cells).float()


@pytest.mark.parametrize("name", sorted(gj.LAYOUTS))
def test_imagination_search_with_a_perfect_model_is_optimal(name):
    """From the current and goal images only, BFS in imagination finds a shortest path for every pair of every
    named layout when the model is perfect - so what the trained model loses is the model's, not the search's."""
    world = gj.World(5, walls=name)
    policy = gj.imagination_policy(OracleModel(world), world)
    result = gj.run_mpc(world, policy)
    assert bool(result.optimal.all())


def test_imagination_policy_searches_each_image_once(monkeypatch):
    """A search depends only on its image: over a whole run of every pair, each image is searched once (from the
    current image or the goal image alike), and the plans are the same as with a fresh planner every step."""
    world = gj.World(5, walls="maze")
    model = OracleModel(world)
    searched = []
    real = gj.imagine_map

    def counting(model, emb, *args):
        searched.extend(emb.argmax(1).tolist())
        return real(model, emb, *args)

    monkeypatch.setattr(gj, "imagine_map", counting)
    policy = gj.imagination_policy(model, world)
    kept = gj.run_mpc(world, policy)
    assert sorted(searched) == sorted(set(searched)) and set(searched) <= set(world.free_cells.tolist())
    for memory in ("remember_bumps", "remember_tried"):  # the same planner with a memory: its searches serve it
        assert torch.equal(gj.run_mpc(world, policy, **{memory: True}).paths, kept.paths)
    assert sorted(searched) == sorted(set(searched))

    def fresh(cells, goals):  # a new planner, so no search is kept between steps
        return gj.imagination_policy(model, world)(cells, goals)

    again = gj.run_mpc(world, fresh)
    torch.testing.assert_close(kept.paths, again.paths)


def test_imagine_map_finds_every_reachable_place_once():
    """With a perfect model, the imagined places from a cell are exactly the cells of its layout, each at its BFS
    depth, wall bumps merged into the place they stay at."""
    world = gj.World(5, walls="u_trap")
    model = OracleModel(world)
    start = model.encode(world.render(torch.tensor([0])))
    found = gj.imagine_map(model, start, max_nodes=64)
    count = int(found["count"][0])
    assert count == len(world.free_cells)
    cells = found["nodes"][0, :count].argmax(1).numpy()
    assert sorted(cells) == sorted(world.free_cells)
    np.testing.assert_array_equal(found["depth"][0, :count].numpy(), world.shortest_paths(0)[cells])


class BlurryBumpModel(OracleModel):
    """A perfect model of moves whose wall bumps are imagined badly, as trained models imagine them: the latent is
    the cell's (column, row), and a bump moves it 0.6 of a step towards the wall instead of leaving it in place."""

    def encode(self, obs):
        return self.place(super().encode(obs).argmax(1))

    def place(self, cells):
        return torch.stack([cells % self.world.grid_size, cells // self.world.grid_size], 1).float()

    def nearest_cell(self, emb):
        free = torch.from_numpy(self.world.free_cells)
        return free[torch.cdist(emb, self.place(free)).argmin(1)]  # the free cell the latent is nearest

    def predict(self, emb, action):
        cells = self.nearest_cell(emb)
        after = self.world.next_cell[cells, action]
        push = torch.tensor(gj.ACTION_DELTAS, dtype=torch.float)[action] * 0.6
        return self.place(after) + push * (after == cells)[:, None]


@pytest.mark.parametrize("name", ["open", "two_rooms", "maze"])
def test_undoing_a_move_tells_a_blurry_bump_from_a_move(name):
    """A bump imagined 0.6 of a step away, beyond half the longest move: the search asks whether the opposite action
    comes back - a bump's does not - and finds every place at its BFS depth; the planner is then optimal on every
    pair. Its one blind spot is a cell walled on both opposite sides (a door, a corridor): there undoing a bump is
    another bump of the same length, so that bump may stay a place of its own (on the open board there is none, and
    every place is found once)."""
    world = gj.World(5, walls=name)
    model = BlurryBumpModel(world)
    cells = world.free_cells[[0, -1]]
    start = model.encode(world.render(torch.from_numpy(cells)))
    found = gj.imagine_map(model, start, max_nodes=64)
    for u, cell in enumerate(cells):
        count = int(found["count"][u])
        assert count == len(world.free_cells) if name == "open" else count >= len(world.free_cells)
        free = torch.from_numpy(world.free_cells)
        places = free[torch.cdist(found["nodes"][u, :count], model.place(free)).argmin(1)]  # nearest free cell
        assert set(places.tolist()) == set(world.free_cells.tolist())
        depth = torch.full((world.num_cells,), 99).scatter_reduce(0, places, found["depth"][u, :count], "amin")
        np.testing.assert_array_equal(
            depth[world.free_cells].numpy(), world.shortest_paths(int(cell))[world.free_cells]
        )
    assert bool(gj.run_mpc(world, gj.imagination_policy(model, world)).optimal.all())


class DoorNearACornerModel(BlurryBumpModel):
    """A perfect model of two_rooms, bumps included, whose map puts the door's latent near a cell diagonal to it -
    (row 1, column 1) - and a move into the door longer than one along the wall, as trained models have learned it:
    the latent is the cell's (column, row), the door's is moved to (1.3, 0.7)."""

    door, at = 12, (1.3, 0.7)

    def place(self, cells):
        return torch.where((cells == self.door)[:, None], torch.tensor(self.at), super().place(cells))

    def predict(self, emb, action):
        return self.place(self.world.next_cell[self.nearest_cell(emb), action])


def test_consistent_merge_keeps_a_door_near_a_corner():
    """The door's latent lies within half a move of the corner cell (row 1, column 1), so a search that merged a new
    latent into whatever place is near would lose the door (or the corner) and with it a room. The search merges
    only into a place that is one such move from the parent too, and finds every place once, at its BFS depth, from
    every cell."""
    world = gj.World(5, walls="two_rooms")
    model = DoorNearACornerModel(world)
    free = torch.from_numpy(world.free_cells)
    start = model.encode(world.render(free))
    found = gj.imagine_map(model, start, max_nodes=64)
    for u, cell in enumerate(free):
        count = int(found["count"][u])
        assert count == len(free)
        places = free[torch.cdist(found["nodes"][u, :count], model.place(free)).argmin(1)]
        assert sorted(places.tolist()) == free.tolist()
        np.testing.assert_array_equal(
            found["depth"][u, :count].numpy(), world.shortest_paths(int(cell))[places.numpy()]
        )


def test_imagined_map_fidelity_tells_a_true_map():
    """A perfect model's searches are true maps at every depth, and so are those of a door near a corner (no room
    lost) and of blurry bumps (no phantom place)."""
    world = gj.World(5, walls="two_rooms")
    perfect = lab.imagined_map_fidelity(OracleModel(world), world)
    assert perfect["depth"] == list(range(1, 11)) and perfect["searches"] == len(world.free_cells)
    assert perfect["complete"] == [1.0] * 10 and perfect["no_phantom"] == [1.0] * 10
    door = DoorNearACornerModel(world)
    assert lab.imagined_map_fidelity(door, world)["complete"] == [1.0] * 10
    open_world = gj.World(5)
    blurry = BlurryBumpModel(open_world)
    assert lab.imagined_map_fidelity(blurry, open_world, max_depth=4)["no_phantom"] == [1.0] * 4
    family = gj.WorldFamily(np.stack([gj.layout_walls("two_rooms"), gj.layout_walls("two_rooms")]))
    assert lab.imagined_map_fidelity(OracleModel(family), family)["searches"] == 2 * len(world.free_cells)
    with pytest.raises(TypeError, match="world must be a World or WorldFamily"):
        lab.imagined_map_fidelity(door, world.walls)
    with pytest.raises(ValueError, match="max_depth must be >= 1"):
        lab.imagined_map_fidelity(door, world, max_depth=0)
    with pytest.raises(ValueError, match="merge must be a number in"):
        lab.imagined_map_fidelity(door, world, merge=1.0)


def test_imagination_policy_bad_arguments(open_world):
    model = OracleModel(open_world)
    with pytest.raises(ValueError, match="merge"):
        gj.imagination_policy(model, open_world, merge=1.5)
    with pytest.raises(ValueError, match="max_depth"):
        gj.imagination_policy(model, open_world, max_depth=0)
    with pytest.raises(ValueError, match="meet 'either' or 'both', got merge=0.5, meet='any'"):
        gj.imagination_policy(model, open_world, meet="any")


# ── the model parts the layouts need ──


def test_inverse_dynamics_term():
    """idm_weight > 0 adds a head and a cross-entropy term that reaches the encoder; 0 leaves the model as it was."""
    cfg = gj.make_config("smoke", idm_weight=1.0)
    world = gj.WorldFamily(gj.procedural_layouts(5, 20))
    model, sigreg = gj.JEPA(cfg), gj.SIGReg(cfg.sigreg_dirs)
    data = gj.make_transitions(world, 64, seed=0)
    obs, actions = gj.sample_batch(world, data, torch.arange(64), "cpu")
    terms = gj.jepa_loss(model, sigreg, obs, actions, cfg, step=0)
    assert 0.5 < float(terms["idm_loss"].detach()) < 3  # ~log 4 for an untrained head
    terms["loss"].backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.inverse[0].weight.grad.abs().sum() > 0
    plain = gj.JEPA(gj.make_config("smoke"))
    assert not hasattr(plain, "inverse")
    assert "idm_loss" not in gj.jepa_loss(plain, sigreg, obs, actions, gj.make_config("smoke"), step=0)


def test_cli_trains_on_generated_layouts_and_scores_unseen_ones(tmp_path):
    """--layouts N trains on N generated layouts and reports next-state accuracy, and imagination search alone and
    remembering what it tried beside BFS, on held-out layouts; lab.evaluate_unseen's planner table of the same model
    (every planner and memory, the named layouts too) gives those figures the same values (smoke profile: numbers
    in range, not quality)."""
    out = tmp_path / "layouts.pt"
    metrics = gj.main(["--profile", "smoke", "--steps", "2", "--layouts", "30", "--out", str(out)])
    assert metrics["heldout_pairs"] == 200  # smoke: 20 held-out layouts x 10 pairs
    assert metrics["heldout_bfs_success"] == metrics["heldout_bfs_optimal"] == 1  # the optimum
    for key in ("training_layouts_next_state_accuracy", "heldout_next_state_accuracy"):
        assert 0 <= metrics[key] <= 1, key
    for one in ("heldout_imagine", "heldout_imagine_tried"):
        assert 0 <= metrics[f"{one}_optimal"] <= metrics[f"{one}_success"] <= 1
    assert metrics["heldout_imagine_tried_success"] >= metrics["heldout_imagine_success"]  # memory only breaks loops
    assert metrics["heldout_imagine_tried_optimal"] == metrics["heldout_imagine_optimal"]
    model, cfg, _ = gj.load_run(out)
    table = lab.evaluate_unseen(model, gj.build_world(cfg), num_layouts=20)
    shared = {k: v for k, v in metrics.items() if k != "train_seconds"}
    assert {k: table[k] for k in shared} == shared
    for key in ("heldout_imagine_memory_success", "heldout_graph_success", "named_random_success"):
        assert 0 <= table[key] <= 1, key
    for where in ("heldout", "named"):
        assert table[f"{where}_bfs_success"] == table[f"{where}_bfs_3x_optimal"] == 1  # the optimum
        for planner in ("imagine", "probe", "graph", "random"):
            for memory in ("", "_memory", "_tried"):
                one, three = (f"{where}_{planner}{memory}{budget}" for budget in ("", "_3x"))
                assert 0 <= table[f"{one}_optimal"] <= table[f"{one}_success"] <= table[f"{three}_success"] <= 1
                assert table[f"{three}_optimal"] == table[f"{one}_optimal"]  # an optimal path fits in the budget
                # a planner deciding from (image, goal image) alone succeeds only where it never repeats an image:
                # memory changes only episodes that would repeat a bump or a loop forever (random: its draws move)
                if memory and planner != "random":
                    assert table[f"{one}_success"] >= table[f"{where}_{planner}_success"]
                    assert table[f"{one}_optimal"] == table[f"{where}_{planner}_optimal"]
    assert cfg.num_layouts == 30
    with pytest.raises(SystemExit):
        gj.main(["--profile", "smoke", "--layouts", "many", "--out", str(tmp_path / "x.pt")])


def test_next_state_table_matches_accuracy(smoke_run):
    """next_state_table lists every (free cell, action) pair once; its share of right answers is the accuracy, and
    its bumps are exactly the moves into walls or off the board."""
    model, world = smoke_run.model, gj.World(5, walls="u_trap")
    table = gj.next_state_table(model, world)
    assert len(table["cell"]) == 4 * len(world.free_cells)
    right = float((table["predicted"] == table["next"]).float().mean())
    assert right == pytest.approx(gj.next_state_accuracy(model, world))
    assert torch.equal(table["bump"], world.next_cell[table["cell"], table["action"]] == table["cell"])
    assert 0 < int(table["bump"].sum()) < len(table["cell"])
    emb = gj.encode_states(model, world).cpu()  # the latents behind the answers, row by row
    row_of = {int(c): i for i, c in enumerate(world.free_cells)}
    assert torch.equal(table["latent"], emb[[row_of[int(c)] for c in table["cell"]]])
    assert torch.equal(table["next_latent"], emb[[row_of[int(c)] for c in table["next"]]])
    with torch.no_grad():
        assert torch.allclose(table["predicted_latent"], model.predict(table["latent"], table["action"]))


def test_layouts_procedural_picks_the_gpu_recipe_on_a_gpu(monkeypatch):
    """--layouts procedural trains the `layouts` profile on a CPU and `layouts_gpu` on a GPU, which differs from it
    only in batch size and length; --profile still wins."""
    picked = []

    def stop(profile, **overrides):
        picked.append(profile)
        raise ValueError("stop here")

    monkeypatch.setattr(gj, "make_config", stop)
    for cuda, extra in ((False, []), (True, []), (True, ["--profile", "smoke"])):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        with pytest.raises(SystemExit):
            gj.main(["--layouts", "procedural", *extra])
    assert picked == ["layouts", "layouts_gpu", "smoke"]
    cpu, gpu = gj.PROFILES["layouts"], gj.PROFILES["layouts_gpu"]
    assert {k for k in cpu.keys() | gpu.keys() if cpu.get(k) != gpu.get(k)} == {"num_steps"}


def test_searches_meet_when_either_would_take_the_place():
    """The meeting rule, on the shipped layouts model and 30 validation layouts (never trained on, even turned or
    mirrored, and never reported; 300 pairs): meeting when either search would take the other's place as its own
    solves more pairs than requiring both."""
    model, _ = lab.load_model(lab.ASSETS / "gridjepa_layouts.pt")
    family = gj.WorldFamily(lab.validation_layouts(5, 30), image_size=model.encoder.image_size)
    gj.calibrate_batchnorm(model, gj.WorldFamily(gj.procedural_layouts(5, 200), image_size=model.encoder.image_size))
    starts, goals = gj.sample_pairs(family, 10, 0)
    solved = {
        meet: gj.run_mpc(family, gj.imagination_policy(model, family, meet=meet), starts, goals).summary()["success"]
        for meet in ("both", "either")
    }
    assert solved["either"] >= 0.97 and solved["either"] > solved["both"], solved


@pytest.fixture(scope="module")
def studies():
    """bench/studies.py, loaded as a module."""
    spec = importlib.util.spec_from_file_location("studies", gj.REPO_ROOT / "bench" / "studies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transition_errors_sorts_every_transition_once(smoke_run, studies):
    """bench/studies.py transition-errors: its counts cover every (free cell, action) pair once, agree with
    next_state_table's, which it sorts, and its per-cell map adds up to the moves read wrong. The smoke model gets
    many wrong, so none of these sums is that of a perfect reading."""
    layouts = gj.heldout_layouts(5, 6)
    report = studies.transition_errors(smoke_run.model, layouts)
    right, moves_by_cell = 0, np.zeros(25)
    for walls in layouts:
        world = gj.World(5, walls=walls)
        t = gj.next_state_table(smoke_run.model, world)
        right += int((t["predicted"] == t["next"]).sum())
        moves_by_cell += np.bincount(t["next"][~t["bump"]].numpy(), minlength=25)
    assert report["moves"] == moves_by_cell.sum() and report["moves"] + report["bumps"] == 4 * int((~layouts).sum())
    assert report["moves_right"] + report["bumps_right"] == right
    wrong = report["moves"] - report["moves_right"]
    assert 0 < wrong and report["moves_as_stays"] <= wrong
    share = np.array(report["move_error_by_cell"])  # rounded to 3 decimals
    assert share.shape == (5, 5) and ((share >= 0) & (share <= 1)).all()
    assert abs((share.reshape(-1) * moves_by_cell).sum() - wrong) <= 5e-4 * moves_by_cell.sum() + 1e-6
    assert len(report["as_stay_along_quartiles"]) == (3 if report["moves_as_stays"] else 0)
    moves, wrong_near = (np.array(report[k]) for k in ("moves_by_ring_walls_near", "wrong_by_ring_walls_near"))
    assert moves.shape == wrong_near.shape == (3, studies.NEAR_BINS, studies.NEAR_BINS)
    assert moves.sum() == report["moves"] and wrong_near.sum() == wrong and (wrong_near <= moves).all()
    centre, around = moves_by_cell[12], moves_by_cell.reshape(5, 5)[1:4, 1:4].sum() - moves_by_cell[12]
    assert moves[0].sum() == centre and moves[1].sum() == around  # rings: the centre cell, the 8 cells around it


def test_walls_near_counts_walls_not_the_border(studies):
    """bench/studies.py's walls_near on a hand-made layout: walls next to each cell and two steps away."""
    walls = np.zeros((5, 5), dtype=bool)
    walls[2, 2] = walls[0, 4] = True
    adjacent, two_away = studies.walls_near(walls)
    assert adjacent[0, 0] == two_away[0, 0] == 0  # a corner: the border is not a wall
    assert adjacent[1, 2] == adjacent[0, 3] == 1 and adjacent[1, 3] == 0
    assert two_away[0, 2] == two_away[1, 3] == two_away[2, 4] == 2  # two steps from both walls
    assert two_away[4, 2] == two_away[2, 0] == 1 and two_away[2, 2] == 0 and adjacent[2, 2] == 0
    random_walls = np.random.default_rng(0).random((6, 6)) < 0.4  # and, cell by cell, on a random layout
    adjacent, two_away = studies.walls_near(random_walls)
    cells = np.argwhere(np.ones((6, 6)))
    steps = np.abs(cells[:, None] - np.argwhere(random_walls)[None]).sum(-1)  # (cell, wall) Manhattan distance
    assert (adjacent.reshape(-1) == (steps == 1).sum(1)).all() and (two_away.reshape(-1) == (steps == 2).sum(1)).all()


def test_transition_errors_study_names_a_bad_readers_row(studies):
    """transition-errors --only: a row the readers study does not have, or a seed it did not run, stops the study
    before it trains anything, naming the argument."""
    with pytest.raises(SystemExit, match="--only: unknown row"):
        studies.transition_errors_study([8], [0], readers=["no such encoder"])
    with pytest.raises(SystemExit, match="--only/--seeds: .* not in readers_study.json"):
        studies.transition_errors_study([8], [99], readers=[next(iter(studies.READER_ROWS))])


def test_layouts_config_takes_the_size_overrides_or_the_ones_given(studies):
    """The layouts study's configs change a grid size's LAYOUTS_SIZE_OVERRIDES fields, or with ``over`` those given
    instead - so the runs of an earlier reader (its rows in the JSON) can be named again - and a row records which."""
    recipe = studies.layouts_config("layouts", 8, 0, 12000)
    assert all(getattr(recipe, k) == v for k, v in studies.LAYOUTS_SIZE_OVERRIDES[8].items())
    earlier = studies.layouts_config("layouts", 8, 0, 20000, over={"input_size": 64, "patch_size": 16})
    assert (earlier.input_size, earlier.patch_size, earlier.crop, earlier.pool) == (64, 16, False, "cls")
    assert gj.default_out_path(earlier) != gj.default_out_path(studies.layouts_config("layouts", 8, 0, 20000))
    assert studies.size_overrides(5) == {} and studies.size_overrides(8, {}) == {}


def test_long_runs_read_each_curve_from_its_checkpoint_or_name_the_command(smoke_run, studies, monkeypatch, tmp_path):
    """bench/studies.py long-runs: each long run's curve, steps and time come from its checkpoint as saved; a run
    that is not there is refused with the command that trains it."""
    cfg = smoke_run.cfg
    gj.save_checkpoint(
        tmp_path / "run.pt", smoke_run.model, cfg, step=cfg.num_steps, history=smoke_run.history, train_seconds=12.5
    )
    monkeypatch.setattr(studies, "LONG_RUNS", [("a run", {"input_size": 32}, cfg.num_steps, 0, "; a note")])
    seeds = []
    monkeypatch.setattr(studies, "layouts_config", lambda profile, size, seed, steps, over: seeds.append(seed) or cfg)
    monkeypatch.setattr(studies.g, "default_out_path", lambda c: tmp_path / "run.pt")
    (run,) = studies.long_runs_study()
    assert run["curve"]["step"] == smoke_run.history["eval_step"]
    assert run["curve"]["next_state_accuracy"] == smoke_run.history["next_state_acc"]
    assert (run["steps_run"], run["train_seconds"], run["overrides"]) == (cfg.num_steps, 12.5, {"input_size": 32})
    assert run["how"].endswith(f"""--steps {cfg.num_steps} --overrides '{{"input_size": 32}}'; a note""")
    monkeypatch.setattr(studies.g, "default_out_path", lambda c: tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt not found: train it with python bench/studies.py layouts"):
        studies.long_runs_study()
    # --only reads the runs it names and keeps the others as saved, so a run whose checkpoint is gone stays listed
    two = [("a run", {"input_size": 32}, cfg.num_steps, 0, ""), ("another", {"input_size": 64}, cfg.num_steps, 1, "")]
    monkeypatch.setattr(studies, "LONG_RUNS", two)
    monkeypatch.setattr(studies.g, "default_out_path", lambda c: tmp_path / "run.pt")
    kept = {"row": "a run", "seed": 0, "curve": "as saved"}
    first, second = studies.long_runs_study(only=["another"], saved=[kept])
    assert first == kept and second["row"] == "another" and second["overrides"] == {"input_size": 64}
    assert second["seed"] == seeds[-1] == 1 and f"--steps {cfg.num_steps} --seeds 1 --overrides" in second["how"]
    with pytest.raises(SystemExit, match="--only: unknown long run"):
        studies.long_runs_study(only=["no such run"])
