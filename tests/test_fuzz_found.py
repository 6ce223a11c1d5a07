"""Inputs a new or careless user gives, each once a crash, a misleading error or a silent wrong result: now a clear
refusal that names the argument and what it accepts, or the right behaviour."""

import dataclasses
import signal
import subprocess
import sys
import time
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


def cli_error(capsys, *args) -> tuple[int, str]:
    """main(args): its exit status and what it wrote to stderr."""
    with pytest.raises(SystemExit) as e:
        gj.main(list(args))
    return e.value.code, capsys.readouterr().err


# ── the command line ──


@pytest.mark.parametrize("value", ["0", "²", "-3"])
def test_layouts_must_be_a_whole_number_of_at_least_one(capsys, tmp_path, value):
    """--layouts 0 trained a single layout without a word; --layouts ² (a digit to str.isdigit) was a traceback."""
    code, err = cli_error(capsys, "--profile", "smoke", "--layouts", value, "--out", str(tmp_path / "x.pt"))
    assert code == 2 and "--layouts must be 'procedural' or a whole number of layouts >= 1" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--layouts", "2000000"], "--layouts (Config.num_layouts) must be"),
        (["--seed", "99999999999999999999"], "--seed (Config.seed) must be"),
        (["--batch-size", "100000"], "--batch-size (Config.batch_size)"),
    ],
)
def test_range_errors_name_the_flag(capsys, tmp_path, args, flag):
    """A setting out of range is named by its flag, not only by its Config field."""
    code, err = cli_error(capsys, "--profile", "smoke", *args, "--out", str(tmp_path / "x.pt"))
    assert code == 2 and flag in err


def test_seed_range_fits_the_batch_generator():
    """seed * 1,000,003 + step seeds each batch: a seed near 2**63 passed validation, then overflowed in training."""
    with pytest.raises(ValueError, match=r"Config\.seed must be >= 0 and <= 4294967295"):
        gj.make_config("smoke", seed=2**63 - 1)


@pytest.mark.parametrize("extra", [["--planner", "cem"], ["--layout", "u_trap"], ["--remember-tried"]])
def test_single_layout_flags_are_refused_for_generated_layouts(capsys, tmp_path, extra):
    """--planner, --layout and the memories were ignored without a word by a run of generated layouts."""
    code, err = cli_error(capsys, "--profile", "smoke", "--layouts", "2", *extra, "--out", str(tmp_path / "x.pt"))
    assert code == 2 and "apply to single-layout runs" in err


@pytest.mark.parametrize("out, says", [("", "got ''"), (".pt", "needs a stem before .pt")])
def test_empty_or_stemless_out(capsys, tmp_path, out, says):
    """--out '' (an unset variable) wrote the default path; --out dir/.pt was told it does not end in .pt."""
    code, err = cli_error(capsys, "--profile", "smoke", "--steps", "2", "--out", str(tmp_path / out) if out else out)
    assert code == 2 and "--out must end in .pt" in err and says in err and not list(tmp_path.iterdir())


def test_ctrl_c_says_how_to_resume(tmp_path):
    """Ctrl-C printed a KeyboardInterrupt traceback; now one line, exit status 130, and the checkpoint resumes."""
    out = tmp_path / "r.pt"
    cmd = [sys.executable, str(gj.REPO_ROOT / "gridjepa_utils.py"), "--profile", "smoke", "--steps", "100000"]
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "run the same command again to resume" in err
    assert gj.load_checkpoint(out)["step"] >= 15  # the smoke profile's first checkpoint


@pytest.mark.parametrize("name", ["r.pt.lock", "r.json"])
def test_lock_paths_that_are_folders(capsys, tmp_path, name):
    """A folder where the lock (or the run record) goes is named as the cause, not taken for a running process."""
    (tmp_path / name).mkdir()
    code, err = cli_error(capsys, "--profile", "smoke", "--steps", "2", "--out", str(tmp_path / "r.pt"))
    assert code == 1 and name in err and "being written by" not in err


# ── settings ──


def test_numpy_numbers_in_a_config_train_save_and_load(tmp_path):
    """numpy ints and floats passed validation, then broke training (the batch seed), default_out_path (JSON) and
    loading (weights_only). They are stored as Python numbers."""
    cfg = gj.make_config("smoke", num_steps=np.int64(2), lam=np.float32(0.5), seed=np.int64(1))
    assert type(cfg.num_steps) is int and type(cfg.lam) is float and type(cfg.seed) is int
    gj.default_out_path(cfg)
    gj.train(cfg, ckpt_path=tmp_path / "np.pt", progress=False)
    assert lab.load_model(tmp_path / "np.pt")[1] == cfg


# ── worlds and data ──


def test_world_family_of_layout_names():
    """A list of names was told 'the first is 6' (the length of 'u_trap')."""
    with pytest.raises(TypeError, match=r"not layout names: pass \[layout_walls\(name\)"):
        gj.WorldFamily(["u_trap", "maze"])


def test_exclude_cells_must_be_cells(open_world):
    """A cell that does not exist was ignored without a word."""
    with pytest.raises(ValueError, match=r"exclude_cells must be cell indices in \[0, 25\), got \(99,\)"):
        gj.make_transitions(open_world, 10, exclude_cells=(99,))


def test_random_layout_wall_fraction_type():
    with pytest.raises(ValueError, match=r"wall_fraction must be in \[0, 1\)"):
        lab.random_layout(5, "0.2")


# ── the model ──


def test_encode_names_a_numpy_image(model):
    with pytest.raises(TypeError, match=r"obs must be a float tensor in \[0, 1\], got ndarray"):
        model.encode(np.zeros((1, 1, 128, 128), np.float32))


def test_predict_and_rollout_take_half_precision_latents(model, smoke_cfg):
    """float16 latents were a matrix-multiply dtype error from inside the predictor."""
    emb = torch.randn(3, smoke_cfg.latent_dim)
    actions = torch.tensor([0, 1, 2])
    assert torch.allclose(model.predict(emb.half(), actions), model.predict(emb.half().float(), actions))
    assert model.rollout(emb.half(), actions[:, None]).shape == (3, 1, smoke_cfg.latent_dim)


# ── planning ──


def test_run_mpc_checks_scores_and_world(open_world):
    """numpy or misshapen scores crashed the memories; a non-tensor entry crashed record=True; world=None was an
    AttributeError."""
    bfs = gj.bfs_policy(open_world)
    zeros = lambda cells: torch.zeros(len(cells), dtype=torch.long)  # noqa: E731
    numpy_scores = lambda c, g: {"action": zeros(c), "scores": np.zeros((len(c), 4))}  # noqa: E731
    res = gj.run_mpc(open_world, numpy_scores, [0], [5], max_steps=3, remember_bumps=True)
    assert bool(res.success[0])  # numpy scores are taken as they are: up bumps, then down, the best one left
    for bad in (torch.zeros(1, 3), "low"):
        policy = lambda c, g, bad=bad: {"action": zeros(c), "scores": bad}  # noqa: E731
        with pytest.raises(ValueError, match=r"the policy returned 'scores' of shape .*; expected \(1, 4\)"):
            gj.run_mpc(open_world, policy, [0], [5], remember_tried=True)
    noted = gj.run_mpc(open_world, lambda c, g: bfs(c, g) | {"note": "hello"}, [0], [5], record=True)
    assert noted.trace[0]["note"] == "hello" and bool(noted.success.all())
    with pytest.raises(TypeError, match=r"world must be a World \(or a WorldFamily\), got NoneType"):
        gj.run_mpc(None, bfs)


def test_probe_policy_checks_its_probe(model, open_world, smoke_cfg):
    """A probe of the wrong width was a matrix error at the first step; a string was 'str is not callable'."""
    D = smoke_cfg.latent_dim
    with pytest.raises(ValueError, match=rf"weight must be \(latent_dim, 2\) = \({D}, 2\), got \(3, 2\)"):
        gj.make_policy("probe", model, open_world, probe=gj.LinearProbe(np.zeros((3, 2)), np.zeros(2)))
    with pytest.raises(TypeError, match=r"probe must be a LinearProbe"):
        gj.make_policy("probe", model, open_world, probe="x")


def test_policy_seeds(model, open_world):
    with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
        gj.random_policy(-1)
    with pytest.raises(TypeError, match=r"seed must be an integer, got 1\.5"):
        gj.cem_policy(model, open_world, seed=1.5)


# ── probes ──


def test_probe_alpha_and_holdout(open_world):
    """alpha=-1 or nan fell back to no ridge; holdout=0 to the default; holdout=2.5 was sklearn's test_size error."""
    x, y = np.random.default_rng(0).normal(size=(25, 8)), open_world.cell_pos(open_world.free_cells)
    for alpha in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0"):
            gj.fit_probe(x, y, alpha=alpha)
    with pytest.raises(ValueError, match=r"holdout must be in \[2, 23\], got 0"):
        gj.probe_report(x, y, holdout=0)
    with pytest.raises(TypeError, match=r"holdout must be an integer, got 2\.5"):
        gj.probe_report(x, y, holdout=2.5)


# ── widgets ──


def test_widgets_want_a_world(model, open_world):
    with pytest.raises(TypeError, match=r"transition_explorer takes a World, got JEPA"):
        gj.transition_explorer(model)
    with pytest.raises(TypeError, match=r"planning_player takes a World first, got NoneType"):
        gj.planning_player(None, {"bfs": gj.bfs_policy(open_world)})


# ── training and checkpoints ──


def test_train_refuses_a_world_or_data_of_another_config(smoke_cfg, open_world):
    """A 4x4 world or 3-frame data trained without a word a model whose config says otherwise."""
    cfg = dataclasses.replace(smoke_cfg, num_steps=1)
    with pytest.raises(ValueError, match=r"world is 4x4 .* Config\.grid_size=5"):
        gj.train(cfg, world=gj.World(4), progress=False)
    with pytest.raises(ValueError, match=r"data must be Transitions of Config\.seq_len=2 frames .* got 3 frames"):
        gj.train(cfg, data=gj.make_transitions(open_world, 64, 3), progress=False)
    with pytest.raises(TypeError, match=r"on_log must be a function"):
        gj.train(cfg, on_log="print", progress=False)


def test_untrained_model_and_estimate_check_their_arguments(smoke_cfg):
    with pytest.raises(TypeError, match=r"expected a Config, got dict"):
        gj.untrained_model(dataclasses.asdict(smoke_cfg))
    with pytest.raises(ValueError, match=r"timed_steps must be >= 1, got 0"):
        lab.estimate_train_time(smoke_cfg, timed_steps=0)


def test_load_on_a_missing_gpu_is_not_called_corrupt(tmp_path, smoke_cfg, model):
    path = tmp_path / "m.pt"
    gj.save_checkpoint(path, model, smoke_cfg)
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(ValueError, match=r"device 'cuda' is not available here \(no CUDA GPU\); load .*m\.pt"):
        lab.load_model(path, device="cuda")


def test_output_lock_in_a_place_that_cannot_hold_it():
    """A lock file that cannot be created was reported as 'being written by another process'."""
    with pytest.raises(OSError, match=r"cannot write /proc/x\.pt \(its lock file /proc/x\.pt\.lock"):
        with gj.output_lock(Path("/proc/x.pt")):
            pass
