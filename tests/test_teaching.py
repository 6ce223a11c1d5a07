"""What the notebooks teach, pinned: causality of the predictor, SIGReg against its formula, AdaLN's modulate,
CEM improving over its iterations; and the helpers the notebooks lean on (load_run, show_source, profiles)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gridjepa_utils as gj

sys.path.insert(0, str(Path(gj.__file__).resolve().parent / "bench"))
import lab  # noqa: E402  (study-only code: bench/lab.py)


def test_load_run_reads_a_notebook_checkpoint_without_json(tmp_path, smoke_run, smoke_cfg):
    """A checkpoint written by train() alone (notebook 03) has no JSON beside it: load_run still gives the model,
    its config and what the checkpoint recorded; this run's record beside it adds the command line's fields."""
    path = tmp_path / "nb03.pt"
    gj.save_checkpoint(path, smoke_run.model, smoke_cfg, None, 30, smoke_run.history)
    model, cfg, run = gj.load_run(path)
    assert cfg == smoke_cfg and run["step"] == 30 and run["command"] is None and run["metrics"] == {}
    assert run["history"] == smoke_run.history
    record = {"kind": gj.RECORD_KIND, "checkpoint": path.name, "config": gj.dataclasses.asdict(smoke_cfg)}
    gj.write_record(path, record | {"command": "python x.py", "metrics": {"plan_success": 1.0}, "step": 99999})
    _, _, run = gj.load_run(path)
    assert run["command"] == "python x.py" and run["metrics"] == {"plan_success": 1.0} and run["step"] == 30


@pytest.mark.parametrize(
    "text, reason",
    [
        ("{not json", "not this run's record: Expecting property name"),
        ('{"step": 99999}', "not written by gridjepa_utils.py"),
        ('{"kind": "gridjepa run record", "command": "x", "checkpoint": "other.pt", "config": {}}', "other.pt"),
        ('{"kind": "gridjepa run record", "command": "x", "checkpoint": "r.pt", "config": {"seed": 7}}', "seed"),
        ('{"kind": "gridjepa run record", "command": 3, "checkpoint": "r.pt", "config": {}}', "wrong type"),
    ],
)
def test_load_run_ignores_a_record_that_is_not_this_runs(tmp_path, smoke_run, smoke_cfg, text, reason):
    """Malformed JSON, a file that is not a record, another checkpoint's record or another run's: load_run warns
    why and keeps the checkpoint's own step and metrics - nothing of that file is trusted."""
    path = tmp_path / "r.pt"
    gj.save_checkpoint(path, smoke_run.model, smoke_cfg, None, 30, smoke_run.history, {"acc": 0.5})
    path.with_suffix(".json").write_text(text)
    with pytest.warns(UserWarning, match=reason):
        _, _, run = gj.load_run(path)
    assert run["step"] == 30 and run["metrics"] == {"acc": 0.5} and run["command"] is None


def test_train_step_is_the_step_train_takes(smoke_cfg, open_world):
    """train_step (shown in notebook 03, used by estimate_train_time) leaves the same weights as train's first step."""
    data = gj.make_transitions(open_world, 500, seed=0)
    ref = gj.train(smoke_cfg, world=open_world, data=data, progress=False, device="cpu", stop_after=1)
    torch.manual_seed(smoke_cfg.seed)
    model = gj.JEPA(smoke_cfg, open_world.image_size)
    sigreg = gj.SIGReg(smoke_cfg.sigreg_dirs, seed=smoke_cfg.seed)
    opt = gj.make_optimizer(model, smoke_cfg)
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
    """FLOPs counted for one step, time measured: total = steps x step time. The count is at least the encoder's
    forward alone: every weight of its Linear and Conv layers multiplied and added once per image."""
    est = lab.estimate_train_time(smoke_cfg, "cpu", timed_steps=2)
    encoder = gj.JEPA(smoke_cfg).encoder
    weights = sum(m.weight.numel() for m in encoder.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d))
    assert est["flops_per_step"] > 2 * weights * smoke_cfg.batch_size * smoke_cfg.seq_len
    assert est["seconds_per_step"] > 0 and est["steps"] == smoke_cfg.num_steps
    assert est["paint_seconds"] == 0  # one layout: its atlas is one gather, nothing to paint first
    assert est["total_seconds"] == pytest.approx(est["seconds_per_step"] * smoke_cfg.num_steps)
    assert "GFLOP" in lab.format_estimate(est, smoke_cfg)


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
    assert len(exact["l2"]) == len(exact["grid_distance"]) == 300 and exact["spearman"] > 0.9
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


# ── what notebooks 02 and 05 teach, checked against the formulas ──


def test_predictor_is_causal(smoke_cfg):
    """Token t sees frames 0..t only: perturbing the latents (or actions) of frames >= 3 leaves the predictions
    for frames 0..2 unchanged and changes the later ones. The modulation is randomised first: at init every
    AdaLN-zero block is the identity, which would make any predictor trivially causal."""
    torch.manual_seed(0)
    pred = gj.Predictor(smoke_cfg).eval()
    for block in pred.blocks:
        torch.nn.init.normal_(block.modulation[1].weight, std=0.2)
        torch.nn.init.normal_(block.modulation[1].bias, std=0.2)
    emb, actions = torch.randn(4, 6, smoke_cfg.latent_dim), torch.randint(0, 4, (4, 6))
    with torch.no_grad():
        out = pred(emb, actions)
        later = emb.clone()
        later[:, 3:] += torch.randn_like(later[:, 3:])
        out_later = pred(later, actions)
        other_actions = actions.clone()
        other_actions[:, 3:] = (other_actions[:, 3:] + 1) % 4
        out_actions = pred(emb, other_actions)
    torch.testing.assert_close(out_later[:, :3], out[:, :3])
    torch.testing.assert_close(out_actions[:, :3], out[:, :3])
    assert (out_later[:, 3:] - out[:, 3:]).abs().max() > 1e-3
    assert (out_actions[:, 3:] - out[:, 3:]).abs().max() > 1e-3


def epps_pulley_reference(z: torch.Tensor, dirs: torch.Tensor, t_max: float = 3.0, knots: int = 17) -> torch.Tensor:
    """SIGReg from notebook 02's formula, in plain float64 torch: for each direction u, x = z u and
    EP = N * integral_{-t_max}^{t_max} exp(-t^2/2) |mean_n exp(i t x_n) - exp(-t^2/2)|^2 dt (trapezoid rule on
    2 * knots - 1 symmetric knots, the same spacing as SIGReg's one-sided grid); mean over directions."""
    z, dirs = z.double(), dirs.double()
    t = torch.linspace(-t_max, t_max, 2 * knots - 1, dtype=torch.float64)
    values = []
    for m in range(dirs.shape[1]):
        x = z @ dirs[:, m]  # (N,)
        ecf = torch.exp(1j * t[:, None] * x[None, :]).mean(1)  # (K,) complex
        integrand = torch.exp(-(t**2) / 2) * (ecf - torch.exp(-(t**2) / 2)).abs() ** 2
        values.append(len(x) * torch.trapezoid(integrand, t))
    return torch.stack(values).mean()


@pytest.mark.parametrize("kind", ["gaussian", "scaled", "collapsed", "shifted"])
def test_sigreg_equals_the_epps_pulley_formula(kind):
    """SIGReg.forward, on its own directions for a fixed step, equals the statistic computed from the formula."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(256, 32, generator=gen)
    z = {"gaussian": z, "scaled": 3 * z, "collapsed": 1e-3 * z + 0.5, "shifted": z + 0.7}[kind]
    sigreg = gj.SIGReg(num_dirs=16, seed=3)
    dirs = sigreg.directions(32, step=7, device="cpu")  # (D, M): the same unit vectors forward draws at step 7
    assert torch.allclose(dirs.norm(dim=0), torch.ones(16))
    expected = epps_pulley_reference(z, dirs)
    torch.testing.assert_close(sigreg(z, step=7).double(), expected, rtol=1e-4, atol=1e-5)


def test_modulate_is_shift_and_scale():
    """AdaLN's modulate(x, shift, scale) = x * (1 + scale) + shift (scale 0 and shift 0: the identity)."""
    gen = torch.Generator().manual_seed(0)
    x, shift, scale = (torch.randn(3, 5, 8, generator=gen) for _ in range(3))
    torch.testing.assert_close(gj.modulate(x, shift, scale), x * (1 + scale) + shift)
    torch.testing.assert_close(gj.modulate(x, torch.zeros_like(x), torch.zeros_like(x)), x)
    torch.testing.assert_close(gj.modulate(x, shift, torch.zeros_like(x)), x + shift)


def test_cem_best_cost_improves_over_iterations(smoke_run):
    """CEM's best cost so far never rises from one iteration to the next, ends strictly below the first
    iteration's on some pairs, and never beats the exhaustive optimum over all 4^H sequences."""
    model, world = smoke_run.model, smoke_run.world
    cells, goals = world.all_pairs()
    policy = gj.cem_policy(model, world, horizon=3, samples=8, elites=2, iterations=4, seed=0)
    out = policy(cells, goals)
    best = out["best_cost_per_iter"]  # (P, iterations)
    assert best.shape == (len(cells), 4)
    assert torch.all(best[:, 1:] <= best[:, :-1])
    assert (best[:, -1] < best[:, 0]).any()
    optimum = gj.imagined_costs(model, world, cells, goals, 3).min(1).values
    assert torch.all(best[:, -1] >= optimum - 1e-6)


def test_show_source_returns_the_module_code(capsys):
    """show_source gives the module's own code (printed outside IPython), dedented for methods."""
    src = gj.show_source(gj.SIGReg.forward)
    assert src.startswith("def forward(self, emb") and "torch.cos(xt)" in src
    assert "def forward" in capsys.readouterr().out
    assert gj.show_source(gj.modulate).strip().endswith("return x * (1 + scale) + shift")


def load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", gj.REPO_ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.py --dry on the CPU, smoke profile, as on a GPU in two calls: the speed eager and compiled, the
    gpu runs (both objectives), then a second call adding the full runs (compiled, a cut schedule) to the same report;
    a third call with no time left skips its runs and says why."""
    import json

    import report  # bench/report.py: RESULTS.md's tables
    import results

    gpu_check, out = load_gpu_check(), tmp_path / "gpu.json"
    argv = ["--dry", "--steps", "2", "--out", str(out)]
    gpu_check.main([*argv, "--phases", "speed,gpu", "--gpu-steps", "4", "--path", "eager"])
    first = json.loads(out.read_text())
    speed = first["profiles"]["smoke"]
    assert first["dry"] and set(first["profiles"]) == {"smoke"} and speed["flops_per_step"] > 0
    for path, timed in (("eager", 2), ("compiled", 2)):
        row = speed[path]
        assert row["status"] == "done" and row["steps_per_s"] > 0 and row["mfu"] is None and row["timed_steps"] == timed
        assert row["images_per_s"] == pytest.approx(row["steps_per_s"] * 32 * 2) and row["warmup_seconds"] > 0
    assert speed["compiled"]["graphs"] >= 1 and speed["compiled"]["warmup_steps"] == 3  # it went through compile
    ratio = speed["compiled"]["steps_per_s"] / speed["eager"]["steps_per_s"]
    assert speed["compiled_over_eager"] == pytest.approx(ratio)
    assert set(first["runs"]) == {"gpu-recipe", "gpu-writeup"}

    returned = gpu_check.main([*argv, "--phases", "full", "--full-steps", "3", "--path", "compiled"])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(returned)) and len(saved["calls"]) == 2  # added to the first call's report
    assert set(saved["runs"]) == {"gpu-recipe", "gpu-writeup", "full-recipe", "full-writeup"}
    commit = results.git_commit()
    assert all(c["commit"] == commit for c in saved["calls"]) and saved["commit"] == commit
    metrics = {"next_state_accuracy", "pc1_plus_pc2", "probe_r2_heldout", "plan_success", "latent_greedy_success"}
    for run_id, run in saved["runs"].items():
        assert run["status"] == "done" and metrics <= set(run) and run["commit"] == commit, run_id
        assert 0.0 <= run["next_state_accuracy"] <= 1.0 and run["train_seconds"] > 0 and run["estimate_s"] > 0
        phase, objective = run_id.split("-")
        assert run["profile"] == "smoke" and run["config"]["compile"] == (phase == "full")
        assert run["path"] == ("compiled" if phase == "full" else "eager")
        assert run.get("graphs", 0) >= (1 if phase == "full" else 0)  # the compiled runs went through compile
        assert run["num_steps"] == run["config"]["num_steps"] == (4 if phase == "gpu" else 3)
        want = (10.0, 0.0) if objective == "writeup" else (0.1, 5.0)
        assert (run["config"]["lam"], run["config"]["smooth_weight"]) == want
    text = report.gpu_section(saved)
    assert "| smoke | 222,848 |" in text and "`full-writeup`" in text and "3 of 30" in text

    late = tmp_path / "late.json"
    gpu_check.main(["--dry", "--phases", "gpu", "--time-limit", "0", "--add-to", str(out), "--out", str(late)])
    runs = json.loads(late.read_text())["runs"]
    assert runs["gpu-recipe"]["status"] == runs["gpu-writeup"]["status"] == "skipped"
    assert "s needed" in runs["gpu-recipe"]["why"] and runs["gpu-recipe"]["estimate_s"] > 0
    assert runs["full-recipe"]["status"] == "done"  # the earlier call's runs are kept


def test_gpu_check_plans_runs_by_time():
    """gpu_check's guard: a run's estimate (compiling, steps, painting, evaluation), the faster path for its length,
    the most steps that fit, and a schedule cut to N steps."""
    gpu_check = load_gpu_check()
    done = dict(status="done", paint_seconds=1.0)
    entry = {"eager": done | {"steps_per_s": 10.0}, "compiled": done | {"steps_per_s": 20.0, "warmup_seconds": 60.0}}
    assert gpu_check.run_estimate(entry, "eager", 100, 5.0) == pytest.approx(1.15 * 10 + 1 + 5)
    assert gpu_check.run_estimate(entry, "compiled", 100, 5.0) == pytest.approx(60 + 1.15 * 5 + 1 + 5)
    assert gpu_check.run_estimate({"eager": {"status": "skipped"}}, "eager", 100, 5.0) is None
    # 2 runs in 400 s: eager (400/2 - 6) * 10 / 1.15 = 1686 -> 1600; compiled (200 - 66) * 20 / 1.15 = 2330 -> 2300
    assert gpu_check.fit_steps(entry, ["eager", "compiled"], 400.0, 2, 5.0) == (2300, "compiled")
    assert gpu_check.fit_steps(entry, ["eager"], 400.0, 2, 5.0) == (1600, "eager")
    assert gpu_check.fit_steps(entry, ["eager", "compiled"], 10.0, 2, 5.0) is None
    cfg = gj.make_config("full")
    short = gpu_check.shorten(cfg, 2000)
    assert (short.num_steps, short.warmup_steps, short.lam) == (2000, 500, cfg.lam)
    assert gpu_check.shorten(cfg, 10**6) == cfg and gpu_check.shorten(cfg, None) == cfg
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops("Tesla T4") == 65e12 and gpu_check.peak_flops("NVIDIA L4") == 121e12
    assert gpu_check.peak_flops("NVIDIA L40S") is None and gpu_check.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12


def test_the_course_keeps_its_size():
    """The shape the series promises its readers: a module of at most 2,000 lines, notebook 05 of at most 35 cells
    and 4,000 words of markdown, a README of at most 8,000 characters."""
    import json

    root = gj.REPO_ROOT
    assert len((root / "gridjepa_utils.py").read_text().splitlines()) <= 2000
    cells = json.loads((root / "notebooks" / "05_planning.ipynb").read_text())["cells"]
    words = sum(len("".join(c["source"]).split()) for c in cells if c["cell_type"] == "markdown")
    assert len(cells) <= 35 and words <= 4000
    assert len((root / "README.md").read_text()) <= 8000
