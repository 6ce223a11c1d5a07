"""The model (SIGReg, AdaLN-zero, encoder/predictor shapes, loss) and the analysis tools (probes, PCA)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gridjepa_utils as gj


@pytest.fixture(scope="module")
def model(smoke_cfg):
    """A freshly initialised smoke-size model in eval mode."""
    torch.manual_seed(0)
    return gj.JEPA(smoke_cfg).eval()


def gaussian(n, d, seed, scale=1.0):
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ── SIGReg ──


def test_sigreg_small_for_gaussian_large_for_collapse_and_scale():
    """SIGReg(1024 samples of N(0, I_64)) is O(1) (measured ~1.0); a collapsed batch (all rows equal) and a
    batch of N(0, 9 I) are each more than 20x larger (measured ~1100 and ~520)."""
    sigreg = gj.SIGReg(256)
    x = gaussian(1024, 64, seed=0)
    g = float(sigreg(x, step=0))
    collapsed = float(sigreg(x[:1].repeat(1024, 1), step=0))
    scaled = float(sigreg(gaussian(1024, 64, seed=1, scale=3.0), step=0))
    assert 0 < g < 2.0
    assert collapsed > 20 * g
    assert scaled > 20 * g


def test_sigreg_detects_a_shifted_mean():
    """A batch with mean 2 on every dimension is far from N(0, I) too (>20x the Gaussian value)."""
    sigreg = gj.SIGReg(256)
    g = float(sigreg(gaussian(1024, 64, seed=0), step=3))
    assert float(sigreg(gaussian(1024, 64, seed=0) + 2.0, step=3)) > 20 * g


def test_sigreg_directions_are_a_function_of_step():
    """Same step -> the same directions, hence the same value; different steps (or step=None) differ."""
    sigreg = gj.SIGReg(256)
    x = gaussian(1024, 64, seed=0)
    assert float(sigreg(x, step=5)) == float(sigreg(x, step=5))
    assert float(sigreg(x, step=5)) != float(sigreg(x, step=6))
    assert torch.equal(sigreg.directions(64, 5, "cpu"), gj.SIGReg(256).directions(64, 5, "cpu"))
    assert not torch.equal(sigreg.directions(64, None, "cpu"), sigreg.directions(64, None, "cpu"))
    dirs = sigreg.directions(64, 5, "cpu")
    assert dirs.shape == (64, 256)
    assert torch.allclose(dirs.norm(dim=0), torch.ones(256), atol=1e-5)


def test_sigreg_has_gradients():
    """SIGReg is differentiable with respect to the latents (it is a loss term)."""
    x = gaussian(256, 16, seed=0, scale=2.0).requires_grad_()
    gj.SIGReg(64)(x, step=0).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


# ── AdaLN-zero predictor ──


def test_adaln_zero_block_is_identity_at_init():
    """At initialisation the action-gated block returns its input exactly, for any x and cond."""
    torch.manual_seed(0)
    block = gj.AdaLNZeroBlock(32, 4)
    x, cond = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert torch.equal(block(x, cond, mask), x)
    # the property is the zero-initialised modulation's: once it is non-zero, the block changes x
    with torch.no_grad():
        block.modulation[1].weight.normal_(0, 0.1)
    assert not torch.allclose(block(x, cond, mask), x, atol=1e-3)


def test_predictor_ignores_the_action_at_init(model, smoke_cfg):
    """An untrained predictor gives the same output for all 4 actions (the action is learned from nothing)."""
    emb = torch.randn(6, smoke_cfg.latent_dim)
    outs = [model.predict(emb, torch.full((6,), a)) for a in range(4)]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    perturbed = gj.JEPA(smoke_cfg).eval()
    with torch.no_grad():
        for block in perturbed.predictor.blocks:
            block.modulation[1].weight.normal_(0, 0.1)
    assert not torch.allclose(
        perturbed.predict(emb, torch.zeros(6, dtype=torch.long)),
        perturbed.predict(emb, torch.ones(6, dtype=torch.long)),
        atol=1e-4,
    )


# ── shapes ──


def test_encode_predict_rollout_shapes(model, smoke_cfg, open_world):
    """encode (B,1,128,128) -> (B,D); predict (B,D),(B,) -> (B,D); rollout (B,D),(B,H) -> (B,H,D)."""
    D = smoke_cfg.latent_dim
    obs = open_world.render(torch.tensor([0, 6, 12]))
    with torch.no_grad():
        emb = model.encode(obs)
        assert emb.shape == (3, D) and emb.dtype == torch.float32
        assert model.predict(emb, torch.tensor([0, 1, 3])).shape == (3, D)
        actions = torch.tensor([[0, 1, 2, 3, 0], [3, 3, 3, 3, 3], [1, 1, 0, 2, 2]])
        roll = model.rollout(emb, actions)
        assert roll.shape == (3, 5, D)
        # the first imagined step is exactly a single-frame prediction
        assert torch.allclose(roll[:, 0], model.predict(emb, actions[:, 0]), atol=1e-5)


def test_rollout_beyond_the_context_window(model, smoke_cfg):
    """rollout longer than the predictor's 16 frames keeps going with a sliding window."""
    emb = torch.randn(2, smoke_cfg.latent_dim)
    with torch.no_grad():
        roll = model.rollout(emb, torch.randint(4, (2, 20)))
    assert roll.shape == (2, 20, smoke_cfg.latent_dim) and torch.isfinite(roll).all()


def test_encode_in_eval_mode_is_per_image(model, open_world):
    """In eval mode an image's latent does not depend on the rest of the batch (BatchNorm uses running stats)."""
    obs = open_world.render(torch.arange(8))
    with torch.no_grad():
        assert torch.allclose(model.encode(obs[:1]), model.encode(obs)[:1], atol=1e-5)
        assert not torch.allclose(model.encode(obs[:1]), model.encode(obs[1:2]), atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2])
def test_encoder_computes_the_cls_output_alone_in_its_last_block(depth):
    """The encoder runs its last block for the CLS token only (Encoder.features): the latents and every weight's
    gradient equal those of running all tokens through all blocks and reading the CLS token, in both modes."""
    cfg = gj.make_config("smoke", depth=depth)
    torch.manual_seed(0)
    enc = gj.JEPA(cfg, 128).encoder
    obs = torch.rand(6, 1, 128, 128)

    def every_token(obs):  # the ViT as written: every token through every block, then the CLS token
        x = gj.rearrange(enc.patch_embed(F.avg_pool2d(obs, 128 // cfg.input_size) * 2 - 1), "b c h w -> b (h w) c")
        x = torch.cat([enc.cls_token.expand(len(obs), -1, -1), x], dim=1) + enc.pos_embed
        return enc.norm(enc.blocks(x))[:, 0]

    for training in (True, False):
        enc.train(training)
        outs, grads = [], []
        for features in (enc.features, every_token):
            enc.zero_grad()
            out = features(obs)
            (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
            outs.append(out.detach())
            grads.append([p.grad.clone() for p in enc.parameters() if p.grad is not None])
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
        assert len(grads[0]) == len(grads[1]) > 0
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_crop_keeps_the_board_rows_and_drops_the_backdrop():
    """crop=True: the encoder sees rows 32-95 of 128 only, in (input/patch) x (input/patch / 2) tokens. Every pixel
    an 8x8 board's walls or agent change lies inside them; a change in the dropped rows leaves the latent as it was,
    and one inside moves it."""
    cfg = gj.make_config("smoke", grid_size=8, input_size=64, patch_size=8, crop=True)
    assert gj.num_patches(cfg) == 32 and gj.num_patches(dataclasses.replace(cfg, crop=False)) == 64
    torch.manual_seed(0)
    model = gj.JEPA(cfg).eval()
    assert model.encoder.pos_embed.shape[1] == 33
    assert gj.count_parameters(model) - gj.count_parameters(gj.JEPA(dataclasses.replace(cfg, crop=False))) == (
        gj.estimate_parameters(cfg) - gj.estimate_parameters(dataclasses.replace(cfg, crop=False))
    )
    walls = np.zeros((8, 8), dtype=bool)
    walls[0, 1:], walls[1:, 0] = True, True  # walls along both back edges, the agent on every free cell
    world = gj.World(8, walls=walls, check_connected=False)
    frames = world.render(torch.as_tensor(world.free_cells), "cpu")
    backdrop = gj.World(8).render(torch.tensor([0]), "cpu")
    changed = (frames - backdrop).abs().amax(dim=(0, 1, 3)) > 0.02  # the rows any wall or agent pixel is in
    assert changed.any() and not changed[:31].any() and not changed[96:].any()
    obs = frames[:2]
    outside, inside = obs.clone(), obs.clone()
    outside[..., :32, :] = 1.0
    outside[..., 96:, :] = 0.0
    inside[..., 60:64, 60:64] = 1 - inside[..., 60:64, 60:64]
    with torch.no_grad():
        z, z_out, z_in = (model.encode(x) for x in (obs, outside, inside))
    torch.testing.assert_close(z_out, z)
    assert (z_in - z).abs().max() > 1e-4
    with pytest.raises(ValueError, match="2 x Config.patch_size must divide"):
        gj.make_config("smoke", input_size=32, patch_size=32, crop=True)


def test_flat_pooling_keeps_which_patch_a_feature_is_in():
    """pool="flat": the features are every patch token's projection in board order (patches x flat_channels): with
    attention's output switched off, a change inside one patch moves that patch's chunk alone. The parameter
    estimate counts the extra layer as the built model does."""
    cfg = gj.make_config("smoke", input_size=32, patch_size=16, pool="flat")
    assert gj.flat_channels(cfg) == 4 * cfg.width // 4
    torch.manual_seed(0)
    model = gj.JEPA(cfg).eval()
    cls = dataclasses.replace(cfg, pool="cls")
    assert gj.count_parameters(model) - gj.count_parameters(gj.JEPA(cls)) == (
        gj.estimate_parameters(cfg) - gj.estimate_parameters(cls)
    )
    obs = torch.rand(2, 1, 32, 32)
    assert model.encoder.features(obs).shape == (2, 4 * gj.flat_channels(cfg))
    assert model.encode(torch.rand(2, 1, 128, 128)).shape == (2, cfg.latent_dim)
    with torch.no_grad():  # without attention's mixing, each chunk of the features is its own patch's token
        for layer in model.encoder.blocks.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
        feats = model.encoder.features(obs).view(2, 4, -1)
        for k, (r, c) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):  # patches in board (row-major) order
            changed = obs.clone()
            changed[..., r : r + 16, c : c + 16] = 1 - changed[..., r : r + 16, c : c + 16]
            moved = (model.encoder.features(changed).view(2, 4, -1) - feats).abs().amax(dim=(0, 2))
            assert moved[k] > 1e-3 and (moved[torch.arange(4) != k] == 0).all()


def test_full_profile_parameter_count():
    """The full (the write-up's) architecture has between 2.5M and 4.5M parameters (measured 3.38M)."""
    table = gj.parameter_table(gj.JEPA(gj.make_config("full")))
    assert 2_500_000 <= table["total"] <= 4_500_000
    assert table["encoder (ViT)"] + table["projector"] + table["predictor"] == table["total"]


# ── loss ──


def _batch(world, seq_len, n=8, seed=0):
    data = gj.make_transitions(world, n, seq_len=seq_len, seed=seed)
    return gj.sample_batch(world, data, torch.arange(n), "cpu")


def test_jepa_loss_terms(smoke_cfg, open_world):
    """The write-up's objective (smooth_weight=0): jepa_loss returns pred_loss, sigreg, loss, latent_std, eff_rank,
    with loss = pred_loss + lam * sigreg."""
    smoke_cfg = dataclasses.replace(smoke_cfg, smooth_weight=0.0)
    torch.manual_seed(0)
    model = gj.JEPA(smoke_cfg).train()
    obs, actions = _batch(open_world, 2)
    assert obs.shape == (8, 2, 1, 128, 128) and actions.shape == (8, 1)
    terms = gj.jepa_loss(model, gj.SIGReg(64), obs, actions, smoke_cfg, step=0)
    assert set(terms) == {"pred_loss", "sigreg", "loss", "latent_std", "eff_rank"}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    assert torch.allclose(terms["loss"], terms["pred_loss"] + smoke_cfg.lam * terms["sigreg"])
    assert float(terms["latent_std"]) > 0
    terms["loss"].backward()
    assert float(model.encoder.patch_embed.weight.grad.abs().sum()) > 0
    unmeasured = gj.jepa_loss(model, gj.SIGReg(64), obs, actions, smoke_cfg, step=0, measure=False)
    assert set(unmeasured) == {"pred_loss", "sigreg", "loss"}  # what train() computes on the steps it does not log
    assert torch.equal(unmeasured["loss"], terms["loss"])


def test_make_optimizer_is_fused_adamw_on_the_cpu(smoke_cfg):
    """The optimiser train() uses: AdamW at the config's lr and weight decay, fused on the CPU (torch >= 2.4)."""
    opt = gj.make_optimizer(gj.JEPA(smoke_cfg), smoke_cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == smoke_cfg.lr and opt.defaults["weight_decay"] == smoke_cfg.weight_decay
    if torch.torch_version.TorchVersion(torch.__version__) >= "2.4":
        assert opt.defaults["fused"] is True


def test_rollout_sees_the_frames_it_was_trained_on(smoke_cfg):
    """A model trained on T=2 rolls out as predict() applied to its own last prediction; one trained on T=4 sees the
    last 3 frames, real or imagined, so from the second step on its rollout differs from that."""
    emb, actions = torch.randn(3, smoke_cfg.latent_dim), torch.randint(4, (3, 5))
    rolls = {}
    for seq_len in (2, 4):
        torch.manual_seed(0)
        model = gj.JEPA(dataclasses.replace(smoke_cfg, seq_len=seq_len)).eval()
        for p in model.parameters():  # AdaLN-zero starts as the identity: give the gates something to do
            torch.nn.init.normal_(p, std=0.1)
        with torch.no_grad():
            rolls[seq_len], z, steps = model.rollout(emb, actions), emb, []
            for h in range(5):
                z = model.predict(z, actions[:, h])
                steps.append(z)
        if seq_len == 2:
            torch.testing.assert_close(rolls[2], torch.stack(steps, 1))
        else:
            torch.testing.assert_close(rolls[4][:, 0], steps[0])
            assert not torch.allclose(rolls[4][:, 1:], torch.stack(steps, 1)[:, 1:])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_predict_and_rollout_refuse_non_finite_latents(model, smoke_cfg, bad):
    """A NaN or inf latent is refused by name instead of giving NaN predictions."""
    emb = torch.zeros(2, smoke_cfg.latent_dim)
    emb[1, 3] = bad
    with pytest.raises(ValueError, match=r"emb holds NaN or inf values"):
        model.predict(emb, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"emb holds NaN or inf values"):
        model.rollout(emb, torch.tensor([[0, 1], [2, 3]]))


def test_jepa_loss_on_longer_trajectories(smoke_cfg, open_world):
    """With seq_len=4 every frame but the last is teacher-forced: pred (B, 3, D) against the real next latents."""
    cfg = dataclasses.replace(smoke_cfg, seq_len=4, smooth_weight=0.0)
    torch.manual_seed(0)
    model = gj.JEPA(cfg).train()
    obs, actions = _batch(open_world, 4)
    assert actions.shape == (8, 3)
    terms = gj.jepa_loss(model, gj.SIGReg(64), obs, actions, cfg, step=0)
    assert set(terms) == {"pred_loss", "sigreg", "loss", "latent_std", "eff_rank"}
    out = model(obs, actions)
    assert out["pred"].shape == (8, 3, cfg.latent_dim)
    assert torch.allclose(terms["pred_loss"], torch.nn.functional.mse_loss(out["pred"], out["emb"][:, 1:]))
    assert torch.allclose(terms["loss"], terms["pred_loss"] + cfg.lam * terms["sigreg"])


def test_lr_schedule(smoke_cfg):
    """Linear warmup to lr, then cosine decay to ~0 at num_steps."""
    cfg = smoke_cfg
    lrs = [gj.lr_at(s, cfg) for s in range(cfg.num_steps)]
    assert lrs[0] == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert lrs[cfg.warmup_steps - 1] == pytest.approx(cfg.lr)
    assert max(lrs) == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lrs[cfg.warmup_steps :], lrs[cfg.warmup_steps + 1 :]))
    assert gj.lr_at(cfg.num_steps, cfg) == pytest.approx(0.0, abs=1e-12)


def test_effective_rank():
    """effective_rank is 1 for collapsed latents and close to D for isotropic ones."""
    assert gj.effective_rank(torch.ones(100, 16)) == pytest.approx(1.0)
    assert gj.effective_rank(gaussian(2000, 16, seed=0)) > 14


# ── probes and PCA ──


def test_fit_probe_recovers_an_exact_linear_map():
    """On y = x W + b, a probe fit on 40 points predicts 20 held-out points with R^2 = 1 and recovers W, b."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 10))
    w, b = rng.standard_normal((10, 2)), rng.standard_normal(2)
    y = x @ w + b
    probe = gj.fit_probe(x[:40], y[:40])
    assert np.all(gj.r2_score(y[40:], probe(x[40:])) > 1 - 1e-9)
    assert np.allclose(probe.weight, w, atol=1e-8) and np.allclose(probe.bias, b, atol=1e-8)
    # torch input gives the same answer
    assert np.allclose(probe(torch.from_numpy(x[40:])).numpy(), y[40:], atol=1e-8)
    # ridge shrinks the weights
    assert np.linalg.norm(gj.fit_probe(x[:40], y[:40], alpha=100.0).weight) < np.linalg.norm(w)


def test_r2_score_reference_points():
    """r2_score: the mean predictor scores exactly 0, a perfect one 1, a worse-than-mean one < 0."""
    rng = np.random.default_rng(1)
    y = rng.standard_normal((30, 2))
    assert np.allclose(gj.r2_score(y, np.broadcast_to(y.mean(0), y.shape)), 0.0, atol=1e-12)
    assert np.allclose(gj.r2_score(y, y), 1.0)
    assert np.all(gj.r2_score(y, -y) < 0)


def test_probe_report_is_honest_about_random_latents(open_world):
    """Random 64-d latents of 25 cells: the in-sample R^2 is ~1 (P < D interpolates anything) but the
    held-out R^2 is far below 1; latents that really encode the position score ~1 held out."""
    rng = np.random.default_rng(0)
    pos = open_world.cell_pos(open_world.free_cells)
    report = gj.probe_report(rng.standard_normal((25, 64)), pos)
    assert report["fit"] > 0.999
    assert report["heldout_mean"] < 0.5
    assert report["ridge_heldout_mean"] < 0.5
    assert report["num_splits"] == 20
    linear = np.concatenate([pos @ rng.standard_normal((2, 8)), 1e-3 * rng.standard_normal((25, 56))], axis=1)
    good = gj.probe_report(linear, pos)
    assert good["heldout_mean"] > 0.99 and good["ridge_heldout_mean"] > 0.99


def test_ridge_alpha_loo_picks_from_its_grid():
    """ridge_alpha_loo returns one of the alphas it was given; noise-free linear data picks the smallest."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 10))
    y_noise = rng.standard_normal((40, 2))
    grid = (0.5, 2.0, 8.0, 32.0)
    assert gj.ridge_alpha_loo(x, y_noise, alphas=grid) in grid
    default_grid = np.logspace(-3, 4, 15)
    alpha = gj.ridge_alpha_loo(x, x @ rng.standard_normal((10, 2)))
    assert alpha == pytest.approx(default_grid[0])


def test_pca_variance_ratios():
    """pca: variance ratios sum to 1 and are sorted; coordinates carry those shares of the variance."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    coords, ratio = gj.pca(x, k=2)
    assert coords.shape == (50, 2) and ratio.shape == (6,)
    assert ratio.sum() == pytest.approx(1.0)
    assert np.all(np.diff(ratio) <= 0)
    total = ((x - x.mean(0)) ** 2).sum()
    assert np.allclose((coords**2).sum(0) / total, ratio[:2])
    # rank-one data has a single component
    _, ratio1 = gj.pca(np.outer(rng.standard_normal(20), rng.standard_normal(4)))
    assert ratio1[0] == pytest.approx(1.0)
