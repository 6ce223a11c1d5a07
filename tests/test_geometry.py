"""The latent-map pieces: the smoothness term, its ramp, the latent-cost planners, the geometry report."""

import dataclasses

import numpy as np
import pytest
import torch

import gridjepa_utils as gj


def test_smoothness_loss_is_zero_for_identical_latents_and_grows_with_distance():
    z = torch.randn(8, 1, 16)
    same = z.expand(8, 3, 16)
    assert gj.smoothness_loss(same).item() == 0.0
    near = torch.cat([z, z + 0.1], 1)
    far = torch.cat([z, z + 1.0], 1)
    assert 0 < gj.smoothness_loss(near) < gj.smoothness_loss(far)
    assert gj.smoothness_loss(far).item() == pytest.approx(1.0)  # MSE of a unit shift in every dimension


def test_smooth_weight_ramps_in_linearly(smoke_cfg):
    cfg = dataclasses.replace(smoke_cfg, smooth_weight=4.0, smooth_ramp=0.5, num_steps=100)
    assert gj.smooth_weight_at(0, cfg) == pytest.approx(4.0 / 50)
    assert gj.smooth_weight_at(24, cfg) == pytest.approx(2.0)
    assert gj.smooth_weight_at(49, cfg) == gj.smooth_weight_at(99, cfg) == 4.0
    assert gj.smooth_weight_at(0, dataclasses.replace(cfg, smooth_ramp=0.0)) == 4.0


def test_jepa_loss_adds_the_weighted_smoothness_term(smoke_cfg, open_world):
    """loss = pred + w(step) * smooth + lam * sigreg, term by term; w = 0 gives the write-up's objective."""
    torch.manual_seed(0)
    model = gj.JEPA(smoke_cfg).train()
    sigreg = gj.SIGReg(smoke_cfg.sigreg_dirs)
    data = gj.make_transitions(open_world, 16, 2, seed=0)
    obs, actions = gj.sample_batch(open_world, data, torch.arange(16), "cpu")
    pure = gj.jepa_loss(model, sigreg, obs, actions, dataclasses.replace(smoke_cfg, smooth_weight=0.0), step=3)
    assert "smooth_loss" not in pure
    cfg = dataclasses.replace(smoke_cfg, smooth_weight=2.0, smooth_ramp=0.0)
    terms = gj.jepa_loss(model, sigreg, obs, actions, cfg, step=3)
    expected = terms["pred_loss"] + 2.0 * terms["smooth_loss"] + cfg.lam * terms["sigreg"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["smooth_loss"].item() > 0


def test_profiles_train_the_map_recipe_and_the_pure_objective_is_one_setting_away():
    for name in ("cpu", "gpu", "full"):
        assert gj.make_config(name).smooth_weight > 0
    assert gj.make_config("cpu", smooth_weight=0.0).smooth_weight == 0.0


def perfect_map_policy(world, kind, **kwargs):
    """Run a latent-cost planner on an ideal map: the latent is the cell's (col, row) and the predictor is the
    true rule of the open grid (moves clipped at the border)."""

    class Ideal(torch.nn.Module):
        cfg = dataclasses.replace(gj.make_config("smoke"), seq_len=2)

        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))
            self.pos = torch.from_numpy(world.cell_pos(np.arange(world.num_cells))).float()

        @property
        def device(self):
            return torch.device("cpu")

        def encode(self, obs):  # not used: encode_states is patched below
            raise AssertionError

        def predict(self, emb, action):
            d = torch.tensor(gj.ACTION_DELTAS, dtype=torch.float)[action]
            return (emb + d).clamp(0, world.grid_size - 1)

        def rollout(self, emb, actions):
            out = []
            for h in range(actions.shape[1]):
                emb = self.predict(emb, actions[:, h])
                out.append(emb)
            return torch.stack(out, 1)

    model = Ideal()
    original = gj.encode_states
    gj.encode_states = lambda m, w, cells: m.pos[cells]
    try:
        if kind == "latent":
            policy = gj.latent_greedy_policy(model, world)
        elif kind == "cem":
            policy = gj.cem_policy(model, world, **kwargs)
        else:
            policy = gj.exhaustive_policy(model, world, **kwargs)
        return gj.run_mpc(world, policy)
    finally:
        gj.encode_states = original


@pytest.mark.parametrize("kind", ["latent", "cem", "search"])
def test_latent_cost_planners_are_optimal_on_a_perfect_map(open_world, kind):
    result = perfect_map_policy(open_world, kind)
    assert result.success.all() and result.optimal.all()


def test_final_step_cost_overshoots_where_the_step_count_cost_lands(open_world):
    """LeWM's final-step cost asks the imagined sequence to *end* on the goal after exactly H moves: with a goal
    one move away and H = 3 the best sequences step past it and back, and the MPC loop can oscillate. The
    step-count cost (steps taken + latent distance in steps, min over the horizon) takes the shortest way."""
    final = perfect_map_policy(open_world, "search", horizon=3, cost="final")
    steps = perfect_map_policy(open_world, "search", horizon=3, cost="steps")
    assert steps.success.all() and steps.optimal.all()
    assert final.success.float().mean() < 1.0


def test_geometry_report_on_the_smoke_run(smoke_run):
    report = gj.geometry_report(smoke_run.model, smoke_run.world)
    assert 0 < report["pc1"] + report["pc2"] <= 1
    assert -1 <= report["spearman_l2_grid"] <= 1
    assert report["latent_std"] > 0 and 1 <= report["effective_rank"] <= 25


@pytest.mark.parametrize("make", [gj.cem_policy, gj.exhaustive_policy])
def test_an_unknown_latent_cost_is_refused_when_the_planner_is_made(smoke_run, make):
    with pytest.raises(ValueError, match=r"cost must be one of \('final', 'steps'\), got 'l1'"):
        make(smoke_run.model, smoke_run.world, cost="l1")
