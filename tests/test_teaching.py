"""What the notebooks teach, pinned: causality of the predictor, SIGReg against its formula, AdaLN's modulate,
CEM improving over its iterations; and the helpers the notebooks lean on (load_run, show_source, profiles)."""

import numpy as np
import pytest
import torch

import gridjepa_utils as gj


def test_load_run_reads_a_notebook_checkpoint_without_json(tmp_path, smoke_run, smoke_cfg):
    """A checkpoint written by train() alone (notebook 03) has no JSON beside it: load_run still gives the model,
    its config and what the checkpoint recorded; a JSON beside it adds the command line's fields."""
    path = tmp_path / "nb03.pt"
    gj.save_checkpoint(path, smoke_run.model, smoke_cfg, None, 30, smoke_run.history)
    model, cfg, run = gj.load_run(path)
    assert cfg == smoke_cfg and run["step"] == 30 and run["command"] is None and run["metrics"] == {}
    assert run["history"] == smoke_run.history
    path.with_suffix(".json").write_text('{"command": "python x.py", "metrics": {"plan_success": 1.0}}')
    _, _, run = gj.load_run(path)
    assert run["command"] == "python x.py" and run["metrics"] == {"plan_success": 1.0}


def test_train_step_is_the_step_train_takes(smoke_cfg, open_world):
    """train_step (shown in notebook 03, used by estimate_train_time) leaves the same weights as train's first step."""
    data = gj.make_transitions(open_world, 500, seed=0)
    ref = gj.train(smoke_cfg, world=open_world, data=data, progress=False, device="cpu", stop_after=1)
    torch.manual_seed(smoke_cfg.seed)
    model = gj.JEPA(smoke_cfg, open_world.image_size)
    sigreg = gj.SIGReg(smoke_cfg.sigreg_dirs, seed=smoke_cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=smoke_cfg.lr, weight_decay=smoke_cfg.weight_decay)
    gen = torch.Generator().manual_seed(smoke_cfg.seed * 1_000_003 + 0)
    idx = torch.randint(len(data), (smoke_cfg.batch_size,), generator=gen)
    obs, actions = gj.sample_batch(open_world, data, idx, "cpu")
    terms = gj.train_step(model, sigreg, opt, obs, actions, smoke_cfg, 0)
    assert set(terms) >= {"loss", "pred_loss", "sigreg"}
    ref_params = dict(ref.model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], msg=name)


def test_gpu_profile_and_the_default_profile(monkeypatch):
    """'gpu' is the default on CUDA (never 'full', 78k steps); it is a scaled-up cpu recipe."""
    cfg = gj.make_config("gpu")
    assert (cfg.input_size, cfg.patch_size, cfg.width, cfg.depth, cfg.batch_size) == (64, 8, 192, 2, 128)
    assert cfg.num_steps <= 5000 and cfg.width % cfg.heads == 0
    monkeypatch.delenv("GRIDJEPA_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gj.active_profile() == "gpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gj.active_profile() == "cpu"


def test_estimate_train_time(smoke_cfg):
    """FLOPs counted for one step, time measured: total = steps x step time."""
    est = gj.estimate_train_time(smoke_cfg, "cpu", timed_steps=2)
    assert est["flops_per_step"] > 1e8 and est["seconds_per_step"] > 0 and est["steps"] == smoke_cfg.num_steps
    assert est["total_seconds"] == pytest.approx(est["seconds_per_step"] * smoke_cfg.num_steps)
    assert "GFLOP" in gj.format_estimate(est, smoke_cfg)


def test_the_five_notebooks_share_one_setup_cell():
    """The Colab setup is one short cell, identical in every notebook: one clone URL, no reinstall of torch."""
    import nbformat

    cells = [nbformat.read(p, as_version=4).cells[1].source for p in sorted(gj.REPO_ROOT.glob("notebooks/*.ipynb"))]
    assert len(cells) == 5 and len(set(cells)) == 1
    setup = cells[0]
    assert setup.count("https://github.com/") == 1 and "pip install" not in setup
    assert len([line for line in setup.splitlines() if line.strip()]) <= 12


def test_latent_vs_grid_distance(open_world):
    """Latents that are the cells' positions rank pairs exactly like Manhattan distance... nearly (L2 vs L1);
    random latents do not. 300 pairs of 25 cells."""
    pos = open_world.cell_pos(open_world.free_cells).astype(float)
    exact = gj.latent_vs_grid_distance(pos, open_world)
    assert len(exact["l2"]) == len(exact["manhattan"]) == 300 and exact["spearman"] > 0.9
    noise = gj.latent_vs_grid_distance(np.random.default_rng(0).standard_normal((25, 64)), open_world)
    assert abs(noise["spearman"]) < 0.2


def test_fit_probe_is_the_minimum_norm_least_squares_fit():
    """With fewer points than dimensions (25 cells, 64-d) the plain probe is the pseudo-inverse solution."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((25, 64)), rng.standard_normal((25, 2))
    probe = gj.fit_probe(x, y)
    xc = x - x.mean(0)
    w = np.linalg.pinv(xc) @ (y - y.mean(0))
    assert np.allclose(probe.weight, w, atol=1e-8) and np.allclose(probe(x), y, atol=1e-8)


def test_encode_states_restores_the_mode(smoke_cfg, open_world):
    """encode_states encodes in eval mode and leaves a model in training mode in training mode (and eval in eval)."""
    model = gj.JEPA(smoke_cfg).train()
    z_train_mode = gj.encode_states(model, open_world)
    assert model.training
    model.eval()
    torch.testing.assert_close(gj.encode_states(model, open_world), z_train_mode)
    assert not model.training
