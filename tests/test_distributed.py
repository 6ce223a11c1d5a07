"""Data-parallel training is the same computation as one process on the global batch.

Two gloo processes on the CPU each take half of a 16-transition batch through DistributedDataParallel. SIGReg's
characteristic-function means and the projector's BatchNorm statistics are all-reduced and SIGReg's directions are
seeded from the step, so the loss (averaged over ranks) and the averaged gradients must equal those of a single
process that sees all 16 transitions.
"""

import pytest
import torch
from gloo import init_gloo, spawn_two

import gridjepa_utils as gj

STEP = 3  # SIGReg's directions are a function of the step: shared by both ranks and the single process


def _batch(cfg):
    world = gj.World(cfg.grid_size)
    data = gj.make_transitions(world, 64, cfg.seq_len, seed=0)
    return gj.sample_batch(world, data, torch.arange(16), "cpu")  # obs (16, T, 1, H, W), actions (16, T-1)


def _model(cfg):
    torch.manual_seed(0)
    return gj.JEPA(cfg)


def _loss_and_grads(model, obs, actions, cfg):
    terms = gj.jepa_loss(model, gj.SIGReg(cfg.sigreg_dirs), obs, actions, cfg, step=STEP)
    terms["loss"].backward()
    module = getattr(model, "module", model)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in terms.items()}, grads


def _rank(rank, world_size, port, out_dir, cfg_kwargs):
    dist = init_gloo(rank, world_size, port)
    try:
        cfg = gj.make_config("smoke", **cfg_kwargs)
        obs, actions = _batch(cfg)
        half = slice(rank * 8, (rank + 1) * 8)
        ddp = torch.nn.parallel.DistributedDataParallel(_model(cfg))
        terms, grads = _loss_and_grads(ddp, obs[half], actions[half], cfg)
        torch.save({"terms": terms, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _compare(tmp_path, **cfg_kwargs):
    spawn_two(_rank, tmp_path, cfg_kwargs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    cfg = gj.make_config("smoke", **cfg_kwargs)
    obs, actions = _batch(cfg)
    terms, grads = _loss_and_grads(_model(cfg), obs, actions, cfg)

    # SIGReg is a statistic of the global batch: every rank computes the single-process value
    for r in ranks:
        assert abs(r["terms"]["sigreg"] - terms["sigreg"]) < 1e-4 * max(1.0, terms["sigreg"])
    # the prediction loss is a mean over transitions: the ranks' halves average to the global one
    mean_loss = sum(r["terms"]["loss"] for r in ranks) / 2
    assert abs(mean_loss - terms["loss"]) < 1e-4 * max(1.0, terms["loss"])
    # DDP averages gradients: both ranks hold the single-process gradient, up to float32 summation order
    # (tolerance: 1e-4 of the largest gradient entry; a missing all-reduce is off by the gradients' own size)
    scale = max(float(g.abs().max()) for g in grads.values())
    for r in ranks:
        assert set(r["grads"]) == set(grads)
        for name, g in grads.items():
            assert float((r["grads"][name] - g).abs().max()) <= 1e-4 * scale, name


@pytest.mark.slow
def test_two_process_loss_and_gradients_equal_single_process(tmp_path):
    _compare(tmp_path)


@pytest.mark.slow
def test_two_process_rollout_loss_equals_single_process(tmp_path):
    """The same with 4-frame sequences and the self-fed rollout loss."""
    _compare(tmp_path, seq_len=4, rollout_weight=1.0)
