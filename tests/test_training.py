"""Training: checkpoints, resuming after a disconnect, reproducibility, collapse warnings, CPU quality."""

import dataclasses
import sys

import numpy as np
import pytest
import torch

import gridjepa_utils as gj

sys.path.insert(0, str(gj.REPO_ROOT / "bench"))
import lab  # noqa: E402  (study-only code: bench/lab.py)


def free_cell_latents(model, world):
    with torch.no_grad():
        return gj.encode_states(model, world)


def test_smoke_run_history_is_complete(smoke_run, smoke_cfg):
    """A smoke run logs every log_every steps, evaluates every eval_every steps, ends in eval mode."""
    h = smoke_run.history
    assert h["step"] == list(range(smoke_cfg.log_every, smoke_cfg.num_steps + 1, smoke_cfg.log_every))
    for key in ("lr", "pred_loss", "sigreg", "loss", "latent_std", "eff_rank"):
        assert len(h[key]) == len(h["step"]) and np.all(np.isfinite(h[key])), key
    assert h["eval_step"] == [15, 30]
    assert all(0.0 <= a <= 1.0 for a in h["next_state_acc"])
    assert not smoke_run.model.training
    assert smoke_run.cfg == smoke_cfg and len(smoke_run.data) == smoke_cfg.num_transitions


def test_checkpoint_round_trip(tmp_path, smoke_run, smoke_cfg):
    """save_checkpoint -> load_checkpoint/load_model gives a model with identical latents, the same config,
    step and history, and leaves no temporary file behind."""
    path = tmp_path / "run" / "model.pt"
    gj.save_checkpoint(path, smoke_run.model, smoke_cfg, None, 30, smoke_run.history, {"acc": 0.5})
    assert path.exists() and not path.with_suffix(".pt.tmp").exists()
    ckpt = gj.load_checkpoint(path, smoke_cfg)
    assert ckpt["step"] == 30 and ckpt["history"] == smoke_run.history and ckpt["metrics"] == {"acc": 0.5}
    model, cfg = lab.load_model(path)
    assert cfg == smoke_cfg
    assert not model.training
    expected = free_cell_latents(smoke_run.model, smoke_run.world)
    assert torch.equal(free_cell_latents(model, smoke_run.world), expected)
    assert torch.equal(free_cell_latents(ckpt["model_obj"], smoke_run.world), expected)


def test_resume_after_disconnect_matches_uninterrupted_run(tmp_path, smoke_run, smoke_cfg):
    """Stop after 15 of 30 steps (a simulated disconnect), train again with the same ckpt_path: the run
    finishes where an uninterrupted one does.

    Batch k and SIGReg's directions at step k are functions of (seed, k) and the optimiser state is
    checkpointed, so the two runs should agree bit for bit on one machine (measured: exactly equal);
    atol=1e-4 leaves room for nondeterministic kernels elsewhere.
    """
    path = tmp_path / "resume.pt"
    first = gj.train(smoke_cfg, ckpt_path=path, stop_after=15, progress=False, device="cpu")
    assert first.history["step"][-1] == 15 and path.exists()
    assert torch.load(path, weights_only=True)["step"] == 15
    resumed = gj.train(smoke_cfg, ckpt_path=path, resume=True, progress=False, device="cpu")
    assert resumed.history["step"] == smoke_run.history["step"]
    np.testing.assert_allclose(resumed.history["pred_loss"], smoke_run.history["pred_loss"], atol=1e-4)
    np.testing.assert_allclose(resumed.history["sigreg"], smoke_run.history["sigreg"], atol=1e-4)
    assert torch.allclose(
        free_cell_latents(resumed.model, resumed.world), free_cell_latents(smoke_run.model, smoke_run.world), atol=1e-4
    )
    assert torch.load(path, weights_only=True)["step"] == smoke_cfg.num_steps
    # a run that is already finished does no more steps when called again
    again = gj.train(smoke_cfg, ckpt_path=path, resume=True, progress=False, device="cpu")
    assert again.history["step"] == smoke_run.history["step"]


def test_resume_false_starts_over(tmp_path, smoke_cfg):
    """resume=False ignores an existing checkpoint and trains from step 0."""
    path = tmp_path / "fresh.pt"
    cfg = dataclasses.replace(smoke_cfg, num_steps=10, num_transitions=500, ckpt_every=5)
    gj.train(cfg, ckpt_path=path, stop_after=5, progress=False, device="cpu")
    assert torch.load(path, weights_only=True)["step"] == 5
    run = gj.train(cfg, ckpt_path=path, resume=False, stop_after=5, progress=False, device="cpu")
    assert run.history["step"] == [5]


def test_train_calls_on_log_with_the_history(smoke_cfg):
    """on_log is called with the history each time a log line is added: the live plot's hook."""
    cfg = dataclasses.replace(smoke_cfg, num_steps=10, num_transitions=500, log_every=5)
    seen = []
    run = gj.train(cfg, on_log=lambda history: seen.append(list(history["step"])), progress=False, device="cpu")
    assert seen == [[5], [5, 10]] and run.history["step"] == [5, 10]


def test_two_runs_are_identical(smoke_run, smoke_cfg):
    """Two uninterrupted smoke runs with the same Config give identical histories and latents."""
    again = gj.train(smoke_cfg, progress=False, device="cpu")
    assert again.history == smoke_run.history
    assert torch.equal(free_cell_latents(again.model, again.world), free_cell_latents(smoke_run.model, smoke_run.world))


def test_different_seed_gives_a_different_run(smoke_cfg):
    """The random seed matters: another seed gives another loss curve."""
    cfg = dataclasses.replace(smoke_cfg, num_steps=5, num_transitions=500)
    a = gj.train(cfg, progress=False, device="cpu")
    b = gj.train(dataclasses.replace(cfg, seed=1), progress=False, device="cpu")
    assert a.history["pred_loss"] != b.history["pred_loss"]


def test_collapse_warning(smoke_cfg):
    """A latent std of 0.001 produces a message telling to raise lam (with its value); 0.9 produces none."""
    msg = gj.collapse_warning(0.001, smoke_cfg)
    assert msg is not None and "lam" in msg and str(smoke_cfg.lam) in msg and "0.0010" in msg
    assert gj.collapse_warning(0.9, smoke_cfg) is None


def test_calibrate_batchnorm_uses_one_image_per_free_cell(smoke_run):
    """After calibration the projector's BatchNorm holds the mean of the free cells' pre-BN features."""
    model, world = smoke_run.model, smoke_run.world
    bn = model.encoder.projector.net[1]
    gj.calibrate_batchnorm(model, world)
    with torch.no_grad():
        feats = model.encoder.projector.net[0](model.encoder.features(world.render(torch.from_numpy(world.free_cells))))
    assert torch.allclose(bn.running_mean, feats.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, feats.var(0), rtol=1e-4, atol=1e-6)
    assert not model.training


# Slow (~45-70 s on 2 CPU cores): it checks the CPU profile's quality, not its speed.
@pytest.mark.slow
def test_cpu_profile_reaches_the_headline_results():
    """make_config('cpu') with seed 0 trains to next-state accuracy 1.0 and plans >= 99% of the 600 pairs."""
    cfg = gj.make_config("cpu", seed=0)
    result = gj.train(cfg, progress=False, device="cpu")
    metrics = gj.evaluate(result.model, result.world, cfg)
    assert metrics["next_state_accuracy"] == 1.0, metrics
    assert metrics["plan_success"] >= 0.99, metrics
    assert result.warnings == []


def test_resume_refuses_changed_training_fields(tmp_path, smoke_cfg):
    """Resuming with another lam would mix two runs: train(resume=True) refuses it by name; a change of a
    bookkeeping field (log_every) is allowed."""
    path = tmp_path / "lam.pt"
    cfg = dataclasses.replace(smoke_cfg, num_steps=10, num_transitions=500, ckpt_every=5)
    gj.train(cfg, ckpt_path=path, stop_after=5, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"lam: checkpoint=0\.1 vs config=1\.0"):
        gj.train(dataclasses.replace(cfg, lam=1.0), ckpt_path=path, progress=False, device="cpu")
    run = gj.train(dataclasses.replace(cfg, log_every=1), ckpt_path=path, progress=False, device="cpu")
    assert run.history["step"] == [5, 6, 7, 8, 9, 10]


@pytest.mark.slow
def test_compiled_training_follows_eager():
    """Config.compile trains the same weights through torch.compile (inductor on the CPU): over 8 steps of the smoke
    profile every logged loss agrees with eager to a relative 1e-4 (kernels fuse, so sums reorder: not bitwise)."""
    cfg = gj.make_config("smoke", num_steps=8, log_every=1, eval_every=10**6)
    eager = gj.train(cfg, progress=False)
    compiled = gj.train(dataclasses.replace(cfg, compile=True), progress=False)
    np.testing.assert_allclose(compiled.history["loss"], eager.history["loss"], rtol=1e-4)
    np.testing.assert_allclose(compiled.history["sigreg"], eager.history["sigreg"], rtol=1e-4)
    assert not np.array_equal(eager.history["loss"][1:], eager.history["loss"][:-1])  # it did train
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # the plain model is trained and saved
    a, b = (gj.encode_states(run.model, run.world) for run in (eager, compiled))  # (N, D) latents of the free cells
    assert (a - b).abs().max() < 1e-2 * a.std()  # AdamW's first steps amplify tiny gradient differences: not 1e-4
