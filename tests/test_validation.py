"""Every setting and argument is checked where it enters, with a message naming it and its allowed range."""

import dataclasses
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gridjepa_utils as gj

sys.path.insert(0, str(Path(gj.__file__).resolve().parent / "bench"))
import lab  # noqa: E402  (study-only code: bench/lab.py)


@pytest.fixture(scope="module")
def model(smoke_cfg):
    torch.manual_seed(0)
    return gj.JEPA(smoke_cfg).eval()


# ── Config ──


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lam", -1.0, r"Config\.lam must be >= 0"),
        ("lam", float("nan"), r"Config\.lam must be a finite number"),
        ("lam", float("inf"), r"Config\.lam must be a finite number"),
        ("num_steps", -5, r"Config\.num_steps must be >= 1"),
        ("num_steps", 0, r"Config\.num_steps must be >= 1"),
        ("num_steps", 2.5, r"Config\.num_steps must be an integer"),
        ("batch_size", 0, r"Config\.batch_size must be >= 1"),
        ("grid_size", 1, r"Config\.grid_size must be >= 2 and <= 16"),
        ("grid_size", 100, r"Config\.grid_size must be >= 2 and <= 16"),
        ("seed", -1, r"Config\.seed must be >= 0"),
        ("seq_len", 1, r"Config\.seq_len must be >= 2 and <= 17"),
        ("lr", 0.0, r"Config\.lr must be > 0"),
        ("idm_weight", -0.5, r"Config\.idm_weight must be >= 0"),
        ("lam", True, r"Config\.lam must be a number"),
        ("layout", "nowhere", r"Config\.layout must be one of"),
        ("projector_norm", "groupnorm", r"Config\.projector_norm must be one of"),
        ("heads", 3, r"Config\.width \(64\) must be divisible by Config\.heads \(3\)"),
        ("input_size", 48, r"Config\.input_size must divide the 128-pixel image"),
        ("batch_size", 1_000_000, r"training batch .* GiB of memory"),
    ],
)
def test_make_config_names_the_bad_field(field, value, message):
    """make_config refuses an out-of-range, non-finite or mistyped setting, naming it and its range."""
    with pytest.raises((ValueError, TypeError), match=message):
        gj.make_config("smoke", **{field: value})


def test_validation_is_generic_over_float_fields(smoke_cfg):
    """Any float field must be finite, also one without a listed range; train() validates before training."""
    with pytest.raises(ValueError, match=r"Config\.weight_decay must be"):
        gj.validate_config(dataclasses.replace(smoke_cfg, weight_decay=float("nan")))
    for f in dataclasses.fields(gj.Config):
        if isinstance(f.default, float):
            with pytest.raises(ValueError, match=rf"Config\.{f.name} must be"):
                gj.validate_config(dataclasses.replace(smoke_cfg, **{f.name: float("inf")}))
    with pytest.raises(ValueError, match=r"Config\.lam must be >= 0"):
        gj.train(dataclasses.replace(smoke_cfg, lam=-1.0), progress=False)
    with pytest.raises(ValueError, match=r"'maze' is 5x5, but Config\.grid_size=6"):
        gj.make_config("smoke", layout="maze", grid_size=6)


def test_every_profile_is_valid():
    for name in gj.PROFILES:
        assert gj.make_config(name).profile == name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lam", "-1"], r"--lam \(Config\.lam\) must be >= 0"),
        (["--lam", "nan"], r"--lam \(Config\.lam\) must be a finite number"),
        (["--lam", "inf"], r"--lam \(Config\.lam\) must be a finite number"),
        (["--steps", "-5"], r"--steps \(Config\.num_steps\) must be >= 1"),
        (["--batch-size", "0"], r"--batch-size \(Config\.batch_size\) must be >= 1"),
        (["--smooth-ramp", "1.5"], r"--smooth-ramp \(Config\.smooth_ramp\) must be >= 0\.0 and <= 1\.0, got 1\.5"),
        (["--seed", "-3"], r"--seed \(Config\.seed\) must be >= 0"),
    ],
)
def test_cli_refuses_bad_settings_before_training(args, message, capsys, tmp_path):
    """Bad --lam, --steps, --batch-size, --smooth-ramp, --seed exit with status 2 and the reason, writing nothing."""
    with pytest.raises(SystemExit) as exit_info:
        gj.main(["--profile", "smoke", "--out", str(tmp_path / "x.pt"), *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


# ── encode: an inference API over images in [0, 1] ──


def test_encode_refuses_0_255_pixels_with_a_hint(model, open_world):
    obs = open_world.render(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"obs values must lie in \[0, 1\].*got \[.*255\]; .*divide by 255"):
        model.encode(obs * 255)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        model.encode(obs - 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_non_finite_pixels(model, open_world, bad):
    obs = open_world.render(torch.tensor([0, 1])).clone()
    obs[0, 0, 5, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or inf"):
        model.encode(obs)


def test_nan_pixel_in_training_forward_leaves_batchnorm_alone(smoke_cfg, open_world):
    """A NaN in a training batch is refused before BatchNorm's running statistics see it."""
    torch.manual_seed(0)
    m = gj.JEPA(smoke_cfg).train()
    bn = m.encoder.projector.net[1]
    before = bn.running_mean.clone()
    obs = open_world.render(torch.tensor([[0, 1], [2, 3]])).clone()
    obs[0, 0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf"):
        m(obs, torch.tensor([[3], [3]]))
    with pytest.raises(ValueError, match=r"NaN or inf"):
        m.encode(obs[:, 0])
    assert torch.equal(bn.running_mean, before)


def test_encode_converts_other_float_dtypes_and_refuses_others(model, open_world):
    """float64 and float16 images are converted (same latents as float32); bool and empty batches are refused."""
    obs = open_world.render(torch.tensor([0, 6]))
    ref = model.encode(obs)
    assert torch.allclose(model.encode(obs.double()), ref, atol=1e-6)
    assert model.encode(obs.half()).dtype == torch.float32
    with pytest.raises(TypeError, match=r"float tensor in \[0, 1\], got torch\.bool"):
        model.encode(obs > 0.5)
    with pytest.raises(ValueError, match=r"obs must have shape \(B, 1, 128, 128\) with B >= 1, got \(0, 1, 128, 128\)"):
        model.encode(obs[:0])


def test_encode_is_inference_only_and_training_forward_keeps_gradients(smoke_cfg, open_world):
    """encode's output carries no gradient (.numpy() works without no_grad); forward stays differentiable."""
    torch.manual_seed(0)
    m = gj.JEPA(smoke_cfg)
    obs = open_world.render(torch.tensor([[0, 1], [2, 3], [4, 9]]))
    emb = m.encode(obs[:, 0])
    assert not emb.requires_grad and emb.numpy().shape == (3, smoke_cfg.latent_dim)
    out = m(obs, torch.tensor([[3], [3], [1]]))
    (out["pred"].square().mean() + out["emb"].square().mean()).backward()
    assert m.encoder.patch_embed.weight.grad is not None and m.encoder.patch_embed.weight.grad.abs().sum() > 0


def test_predict_and_rollout_check_latent_width(model):
    with pytest.raises(ValueError, match=r"with D = latent_dim = 192, got \(2, 7\)"):
        model.predict(torch.zeros(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"expected emb \(B, D\) and actions \(B, H\)"):
        model.rollout(torch.zeros(2, 192), torch.tensor([0, 1]))


# ── planning ──


def test_run_mpc_arguments(open_world):
    """max_steps < 1, goals without starts, empty or 2-D pairs are refused instead of reporting a success."""
    policy = gj.bfs_policy(open_world)
    for bad in (-3, 0):
        with pytest.raises(ValueError, match=r"max_steps must be >= 1"):
            gj.run_mpc(open_world, policy, max_steps=bad)
    for bad in (2.5, True, "8"):
        with pytest.raises(TypeError, match=r"max_steps must be an integer"):
            gj.run_mpc(open_world, policy, max_steps=bad)
    with pytest.raises(TypeError, match=r"policy must be callable"):
        gj.run_mpc(open_world, "bfs")
    with pytest.raises(TypeError, match=r"record must be True or False"):
        gj.run_mpc(open_world, policy, record=1)
    huge = gj.run_mpc(open_world, policy, torch.tensor([0]), torch.tensor([24]), max_steps=10**9)
    assert huge.paths.shape == (1, 9) and huge.steps.tolist() == [8]  # memory follows the steps run, not max_steps
    with pytest.raises(ValueError, match=r"pass both starts and goals"):
        gj.run_mpc(open_world, policy, goals=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"pass both starts and goals"):
        gj.run_mpc(open_world, policy, starts=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"non-empty 1-D tensors"):
        gj.run_mpc(open_world, policy, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


def test_run_mpc_refuses_a_policys_invalid_action(open_world):
    """A policy returning action -1 (or 4, or the wrong number of actions) is an error, not a move right."""
    for action in (-1, 4):
        with pytest.raises(ValueError, match=rf"action {action} is not valid"):
            gj.run_mpc(open_world, lambda c, g, a=action: {"action": torch.full((len(c),), a)})
    with pytest.raises(ValueError, match=r"actions of shape \(1,\) for 600 pairs"):
        gj.run_mpc(open_world, lambda c, g: {"action": torch.zeros(1, dtype=torch.long)})


def test_cem_arguments(model, open_world):
    with pytest.raises(ValueError, match=r"iterations must be >= 1, got 0"):
        gj.cem_policy(model, open_world, iterations=0)
    with pytest.raises(ValueError, match=r"smoothing must be a number in \[0, 1\]"):
        gj.cem_policy(model, open_world, smoothing=1.5)


def test_search_memory_is_estimated_before_allocating(model, open_world):
    """exhaustive_policy(horizon=8) and cem_policy(horizon=8) would need ~23 GiB: refused, naming the horizon."""
    for make in (gj.exhaustive_policy, gj.cem_policy):
        with pytest.raises(ValueError, match=r"horizon=8 .* GiB of memory, above the limit"):
            make(model, open_world, horizon=8)
    with pytest.raises(TypeError, match=r"horizon H must be an integer"):
        gj.exhaustive_policy(model, open_world, horizon=2.0)


def test_probe_report_needs_enough_points():
    """2 points (R^2 of -4.5e10 before) are refused; so are mismatched lengths and NaN."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"at least 4 points"):
        gj.probe_report(rng.normal(size=(2, 5)), rng.normal(size=(2, 2)))
    with pytest.raises(ValueError, match=r"expected emb \(P, D\) and pos \(P, k\)"):
        gj.probe_report(rng.normal(size=(10, 5)), rng.normal(size=(9, 2)))
    with pytest.raises(ValueError, match=r"finite"):
        gj.probe_report(np.full((10, 5), np.nan), rng.normal(size=(10, 2)))
    with pytest.raises(ValueError, match=r"holdout must be in \[2, 8\], got 9"):
        gj.probe_report(rng.normal(size=(10, 5)), rng.normal(size=(10, 2)), holdout=9)


# ── data ──


def test_make_transitions_memory_and_types(open_world):
    """make_transitions(10**8) is refused with its memory estimate; a float count or negative seed too."""
    with pytest.raises(ValueError, match=r"make_transitions\(num=100,000,000.*GiB of memory"):
        gj.make_transitions(open_world, 10**8)
    with pytest.raises(TypeError, match=r"num must be an integer"):
        gj.make_transitions(open_world, 1e3)
    with pytest.raises(ValueError, match=r"seed must be >= 0"):
        gj.make_transitions(open_world, 10, seed=-1)
    with pytest.raises(ValueError, match=r"leaves no free cell"):
        gj.make_transitions(open_world, 10, exclude_cells=tuple(range(25)))


def test_world_fuzz_inputs(open_world):
    """Float positions, a wall fraction of 1 and a layout with no free cell are refused clearly."""
    with pytest.raises(TypeError, match=r"two integers"):
        open_world.render_pos(1.5, 2)
    with pytest.raises(ValueError, match=r"wall_fraction must be in \[0, 1\)"):
        lab.random_layout(5, 1.0)
    with pytest.raises(ValueError, match=r"at least two free cells"):
        gj.World(5, walls=np.ones((5, 5), dtype=bool))


def test_memory_limit_variable_is_checked_like_a_flag(monkeypatch):
    """$GRIDJEPA_MEMORY_LIMIT_GB must be a number of GiB in (0, 1e6]: text, nan, inf, 0 and negatives are refused."""
    for bad in ("abc", "nan", "inf", "-1", "0"):
        monkeypatch.setenv("GRIDJEPA_MEMORY_LIMIT_GB", bad)
        with pytest.raises(ValueError, match=r"GRIDJEPA_MEMORY_LIMIT_GB must be a number of GiB > 0 and <= 1000000"):
            gj.memory_limit_bytes()
    monkeypatch.setenv("GRIDJEPA_MEMORY_LIMIT_GB", "0.5")
    assert gj.memory_limit_bytes() == 2**29


def test_world_arguments_name_their_range():
    """An image size outside [32, 1024], a cell outside [0, num_cells), a state with the agent or the target on a
    wall, and a negative random_layout seed are refused, naming the argument and its range."""
    for bad in (0, 8, 2000):
        with pytest.raises(ValueError, match=r"image_size must be in \[32, 1024\]"):
            gj.World(5, image_size=bad)
    assert gj.World(5, image_size=64).render(torch.tensor([0])).shape == (1, 1, 64, 64)
    trap = gj.World(5, walls="u_trap")
    for bad in (-1, 25):
        with pytest.raises(ValueError, match=r"cells must be integers in \[0, 25\)"):
            trap.cell_pos(bad)
    wall = trap.cell_index(1, 1)
    with pytest.raises(ValueError, match=rf"state {wall} puts the agent or the target on a wall"):
        trap.render(torch.tensor([0, wall]))
    with pytest.raises(ValueError, match=r"on a wall"):
        gj.World(5, walls="u_trap", show_target=True).render(torch.tensor([25 * wall]))
    with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
        lab.random_layout(5, 0.25, -1)
