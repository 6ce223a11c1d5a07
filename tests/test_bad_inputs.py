"""Bad inputs fail early with an error that says what was expected."""

import dataclasses

import numpy as np
import pytest
import torch

import gridjepa_utils as gj


@pytest.fixture(scope="module")
def u_trap():
    return gj.World(5, walls="u_trap")


@pytest.fixture(scope="module")
def model(smoke_cfg):
    """An untrained smoke-size model (validation happens before any weight is used)."""
    torch.manual_seed(0)
    return gj.JEPA(smoke_cfg).eval()


# ── actions ──


@pytest.mark.parametrize("bad", [7, -1, 4])
def test_world_step_rejects_out_of_range_action(open_world, bad):
    """World.step: an action outside 0..3 is a ValueError naming the bad action and the valid range."""
    with pytest.raises(ValueError, match=rf"action {bad} is not valid; expected 0\.\.3"):
        open_world.step(torch.tensor([0, 1]), torch.tensor([1, bad]))


@pytest.mark.parametrize("bad", [7, -1])
def test_predict_rejects_out_of_range_action(model, smoke_cfg, bad):
    """JEPA.predict: an action outside 0..3 is a ValueError naming the valid range."""
    emb = torch.zeros(2, smoke_cfg.latent_dim)
    with pytest.raises(ValueError, match=r"expected 0\.\.3"):
        model.predict(emb, torch.tensor([0, bad]))


def test_float_actions_are_type_errors(open_world, model, smoke_cfg):
    """A float action tensor is a TypeError that asks for integers (World.step, predict, rollout)."""
    with pytest.raises(TypeError, match=r"action must hold integers"):
        open_world.step(torch.tensor([0]), torch.tensor([1.0]))
    emb = torch.zeros(1, smoke_cfg.latent_dim)
    with pytest.raises(TypeError, match=r"action must hold integers"):
        model.predict(emb, torch.tensor([1.0]))
    with pytest.raises(TypeError, match=r"action must hold integers"):
        model.rollout(emb, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(TypeError, match=r"torch\.Tensor of integers"):
        open_world.step(torch.tensor([0]), [1])


def test_world_step_rejects_bad_states(open_world, u_trap):
    """World.step: a state off the state range, a wall cell, or a shape mismatch is a ValueError."""
    with pytest.raises(ValueError, match=r"states must lie in \[0, 25\)"):
        open_world.step(torch.tensor([25]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"wall"):
        u_trap.step(torch.tensor([u_trap.cell_index(1, 1)]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"same shape"):
        open_world.step(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(TypeError, match=r"state must hold integers"):
        open_world.step(torch.tensor([0.0]), torch.tensor([0]))


def test_predict_rejects_bad_shapes(model, smoke_cfg):
    """JEPA.predict wants emb (B, D) and action (B,)."""
    with pytest.raises(ValueError, match=r"expected emb \(B, D\) and action \(B,\)"):
        model.predict(torch.zeros(3, smoke_cfg.latent_dim), torch.tensor([0, 1]))


# ── positions and grids ──


def test_positions_off_the_grid(open_world):
    """cell_index(5, 0) and render_pos(-1, 2) name the grid and the valid range."""
    with pytest.raises(ValueError, match=r"off the 5x5 grid; expected 0 <= col, row < 5"):
        open_world.cell_index(5, 0)
    with pytest.raises(ValueError, match=r"\(col=-1, row=2\) is off the 5x5 grid"):
        open_world.render_pos(-1, 2)


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5])
def test_grid_size_too_small(bad):
    """grid_size must be an integer >= 2."""
    with pytest.raises(ValueError, match=r"grid_size must be an integer >= 2"):
        gj.World(bad)


def test_grid_size_too_large():
    """grid_size above 16 is refused (the 128x128 image would be unreadable)."""
    with pytest.raises(ValueError, match=r"grid_size must be an integer >= 2 and <= 16"):
        gj.World(17)


def test_layout_wrong_shape():
    """A layout array of the wrong shape is a ValueError giving the expected (G, G)."""
    with pytest.raises(ValueError, match=r"shape \(grid_size, grid_size\) = \(5, 5\), got \(4, 5\)"):
        gj.World(5, walls=np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError, match=r"is 5x5, but grid_size=6"):
        gj.World(6, walls="maze")


def test_layout_wrong_dtype():
    """A non-boolean layout array is a TypeError asking for a boolean array."""
    with pytest.raises(TypeError, match=r"must be a boolean array"):
        gj.World(5, walls=np.zeros((5, 5), dtype=int))


def test_unknown_layout_name():
    """An unknown layout name lists the known ones."""
    with pytest.raises(ValueError, match=r"unknown layout 'spiral'; expected one of .*u_trap"):
        gj.World(5, walls="spiral")


def test_disconnected_layout_is_refused():
    """A layout whose free cells are split is refused (unless check_connected=False)."""
    walls = np.zeros((5, 5), dtype=bool)
    walls[:, 2] = True
    with pytest.raises(ValueError, match=r"cannot be reached"):
        gj.World(5, walls=walls)
    assert gj.World(5, walls=walls, check_connected=False).walls.sum() == 5


def test_render_pos_on_a_wall(u_trap):
    """render_pos on a wall cell: the agent cannot stand there."""
    with pytest.raises(ValueError, match=r"\(col=1, row=1\) is a wall cell"):
        u_trap.render_pos(1, 1)


def test_render_pos_needs_target_when_drawn():
    """A show_target world asks for target=(col, row)."""
    world = gj.World(3, show_target=True)
    with pytest.raises(ValueError, match=r"pass target=\(col, row\)"):
        world.render_pos(0, 0)


def test_render_rejects_out_of_range_states(open_world):
    """render of a state outside [0, num_states) names the range."""
    with pytest.raises(ValueError, match=r"states must lie in \[0, 25\)"):
        open_world.render(torch.tensor([30]))


# ── model inputs ──


@pytest.mark.parametrize("shape", [(2, 3, 128, 128), (2, 1, 64, 64), (1, 128, 128)])
def test_encode_wrong_shape(model, shape):
    """JEPA.encode names the expected (B, 1, 128, 128) and the shape it got."""
    got = rf"\({', '.join(map(str, shape))}\)"
    with pytest.raises(ValueError, match=r"obs must have shape \(B, 1, 128, 128\) with B >= 1, got " + got):
        model.encode(torch.zeros(shape))


def test_encode_wrong_dtype(model):
    """JEPA.encode of a uint8 tensor (raw pixels) is a TypeError asking for floats in [0, 1]."""
    with pytest.raises(TypeError, match=r"float tensor in \[0, 1\], got torch\.uint8"):
        model.encode(torch.zeros(2, 1, 128, 128, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"float tensor"):
        model.encode(np.zeros((2, 1, 128, 128), dtype=np.float32))


def test_predictor_history_too_long(model, smoke_cfg):
    """The predictor refuses a history longer than its 16 time embeddings."""
    with pytest.raises(ValueError, match=r"at most 16 frames, got 17"):
        model.predictor(torch.zeros(1, 17, smoke_cfg.latent_dim), torch.zeros(1, 17, dtype=torch.long))


def test_bad_projector_norm(smoke_cfg):
    """projector_norm other than batchnorm/layernorm is refused by name."""
    with pytest.raises(ValueError, match=r"projector_norm must be 'batchnorm' or 'layernorm'"):
        gj.JEPA(dataclasses.replace(smoke_cfg, projector_norm="groupnorm"))


# ── planning inputs ──


def test_run_mpc_start_or_goal_on_a_wall(u_trap):
    """run_mpc refuses a start or a goal on a wall cell, saying which."""
    policy = gj.bfs_policy(u_trap)
    wall, free = u_trap.cell_index(1, 1), u_trap.cell_index(0, 0)
    with pytest.raises(ValueError, match=r"start cell .* is a wall"):
        gj.run_mpc(u_trap, policy, torch.tensor([wall]), torch.tensor([free]))
    with pytest.raises(ValueError, match=r"goal cell .* is a wall"):
        gj.run_mpc(u_trap, policy, torch.tensor([free]), torch.tensor([wall]))
    with pytest.raises(ValueError, match=r"start cells must lie in \[0, 25\)"):
        gj.run_mpc(u_trap, policy, torch.tensor([25]), torch.tensor([free]))


def test_run_mpc_wall_message_names_the_cell_plainly(u_trap):
    """The wall error of run_mpc reads 'start cell (1, 1) is a wall'."""
    with pytest.raises(ValueError, match=r"start cell \(1, 1\) is a wall"):
        gj.run_mpc(u_trap, gj.bfs_policy(u_trap), torch.tensor([u_trap.cell_index(1, 1)]), torch.tensor([0]))


@pytest.mark.parametrize("horizon", [0, -2])
def test_search_planners_reject_horizon_below_one(model, open_world, horizon):
    """exhaustive_policy and cem_policy: horizon must be >= 1."""
    with pytest.raises(ValueError, match=r"horizon H must be >= 1"):
        gj.exhaustive_policy(model, open_world, horizon=horizon)
    with pytest.raises(ValueError, match=r"horizon H must be >= 1"):
        gj.cem_policy(model, open_world, horizon=horizon)


def test_cem_rejects_more_elites_than_samples(model, open_world):
    """cem_policy needs 1 <= elites <= samples."""
    with pytest.raises(ValueError, match=r"elites \(at most samples\) must be in \[1, 4\], got 8"):
        gj.cem_policy(model, open_world, samples=4, elites=8)


def test_unknown_planner(model, open_world):
    """make_policy lists the planners it knows."""
    with pytest.raises(ValueError, match=r"unknown planner 'astar'; expected one of .*graph"):
        gj.make_policy("astar", model, open_world)


# ── data and config ──


def test_make_transitions_seq_len_one(open_world):
    """A trajectory needs a before and an after: seq_len=1 is refused, as is num=0."""
    with pytest.raises(ValueError, match=r"seq_len must be >= 2"):
        gj.make_transitions(open_world, 10, seq_len=1)
    with pytest.raises(ValueError, match=r"num must be >= 1"):
        gj.make_transitions(open_world, 0)


def test_make_config_unknown_profile():
    """An unknown profile lists the known ones."""
    known = r"\['cpu', 'full', 'gpu', 'layouts', 'layouts_gpu', 'smoke'\]"
    with pytest.raises(ValueError, match=r"unknown profile 'tiny'; expected one of " + known):
        gj.make_config("tiny")


def test_make_config_unknown_field():
    """A misspelt override is refused by name (not silently ignored)."""
    with pytest.raises(TypeError, match=r"unknown Config fields: \['lamda'\]"):
        gj.make_config("smoke", lamda=1.0)


def test_bad_profile_in_environment(monkeypatch):
    """$GRIDJEPA_PROFILE naming no profile is a ValueError that lists the valid ones."""
    monkeypatch.setenv("GRIDJEPA_PROFILE", "fast")
    with pytest.raises(ValueError, match=r"GRIDJEPA_PROFILE='fast'; expected one of"):
        gj.make_config()


def test_load_checkpoint_with_mismatched_config(tmp_path, model, smoke_cfg):
    """Loading a checkpoint into a config of another width is refused, naming the field and both values;
    a difference in a training-only field (lr) is accepted."""
    path = tmp_path / "untrained.pt"
    gj.save_checkpoint(path, model, smoke_cfg)
    wider = dataclasses.replace(smoke_cfg, width=96)
    with pytest.raises(ValueError, match=r"width: checkpoint=64 vs config=96"):
        gj.load_checkpoint(path, wider)
    ckpt = gj.load_checkpoint(path, dataclasses.replace(smoke_cfg, lr=0.123))
    assert ckpt["cfg"].width == 64 and ckpt["cfg"].lr == smoke_cfg.lr


def test_train_refuses_resuming_a_mismatched_checkpoint(tmp_path, model, smoke_cfg):
    """train(resume=True) on a checkpoint of another architecture fails before training."""
    path = tmp_path / "other.pt"
    gj.save_checkpoint(path, model, smoke_cfg)
    with pytest.raises(ValueError, match=r"depth: checkpoint=1 vs config=2"):
        gj.train(dataclasses.replace(smoke_cfg, depth=2), ckpt_path=path, progress=False)


def test_run_mpc_unreachable_goal():
    """Planning towards a goal walled off from the start is refused before any step is taken."""
    walls = np.zeros((5, 5), dtype=bool)
    walls[:, 2] = True
    world = gj.World(5, walls=walls, check_connected=False)
    with pytest.raises(ValueError, match=r"cannot be reached from their start"):
        gj.run_mpc(
            world, gj.bfs_policy(world), torch.tensor([world.cell_index(0, 0)]), torch.tensor([world.cell_index(4, 0)])
        )


def test_run_mpc_remember_bumps_bad_inputs(open_world, monkeypatch):
    """remember_bumps and remember_tried must be bools; with a policy that scores nothing, memory ranks the allowed
    actions alike (the first is taken); the memory's counts are checked against the limit before they are allocated."""
    start, goal = torch.tensor([open_world.cell_index(0, 0)]), torch.tensor([open_world.cell_index(4, 4)])
    with pytest.raises(TypeError, match=r"remember_bumps must be True or False, got 'yes'"):
        gj.run_mpc(open_world, gj.bfs_policy(open_world), start, goal, remember_bumps="yes")

    def unscored(cells, goals):  # always "up": from the top row, a bump
        return {"action": torch.zeros(len(cells), dtype=torch.long)}

    bumped = gj.run_mpc(open_world, unscored, start, goal, max_steps=3, remember_bumps=True, record=True)
    assert [int(step["action"][0]) for step in bumped.trace] == [0, 1, 0]  # up (a bump), then down, then up again
    with pytest.raises(TypeError, match=r"remember_tried must be True or False, got 1"):
        gj.run_mpc(open_world, gj.bfs_policy(open_world), start, goal, remember_tried=1)
    tried = gj.run_mpc(open_world, unscored, start, goal, max_steps=4, remember_tried=True, record=True)
    assert [int(step["action"][0]) for step in tried.trace] == [0, 1, 0, 2]  # back at (0, 0): left, not yet taken
    starts, goals = open_world.all_pairs()  # 600 pairs x 25 images x 4 actions of counts: 240 kB
    monkeypatch.setenv("GRIDJEPA_MEMORY_LIMIT_GB", "0.0001")
    with pytest.raises(ValueError, match=r"run_mpc\(remember_tried=True\) for 600 pairs would need about"):
        gj.run_mpc(open_world, gj.bfs_policy(open_world), starts, goals, remember_tried=True)
