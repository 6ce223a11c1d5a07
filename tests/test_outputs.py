"""Nothing lost, nothing silent: output paths, concurrent runs, checkpoint integrity, refusals that say why."""

import dataclasses
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gridjepa_utils as gj

sys.path.insert(0, str(gj.REPO_ROOT / "bench"))
import lab  # noqa: E402  (study-only code: bench/lab.py)

SMOKE = ["--profile", "smoke", "--steps", "2"]


@pytest.fixture(scope="module")
def model(smoke_cfg):
    torch.manual_seed(0)
    return gj.JEPA(smoke_cfg).eval()


def run_cli(*args) -> int:
    """main() in this process; the exit status (0 when it returns)."""
    try:
        gj.main([*SMOKE, *map(str, args)])
    except SystemExit as e:
        return e.code
    return 0


def leftovers(folder: Path) -> list[str]:
    """Temporary files or lock-holder pids a run left behind (a .lock file nobody holds is inert: the OS lock on it
    went with its process)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".pid", ".probe")))


# ── output paths never coincide and never clobber ──


def test_out_must_end_in_pt(tmp_path, capsys):
    """--out model.json would make the checkpoint and its record one file: refused before anything is written."""
    assert run_cli("--out", tmp_path / "model.json") == 2
    assert "--out must end in .pt" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unrelated_json_beside_out_is_not_overwritten(tmp_path, capsys):
    """--out results.pt next to someone's results.json: refused before training, the file untouched."""
    other = tmp_path / "results.json"
    other.write_text('{"mine": 1}')
    assert run_cli("--out", tmp_path / "results.pt") == 1
    assert f"refusing to overwrite {other}" in capsys.readouterr().err
    assert other.read_text() == '{"mine": 1}' and not (tmp_path / "results.pt").exists()


def test_symlink_at_record_path_is_refused(tmp_path, capsys):
    """A symlink planted at x.json is not followed: the run is refused and the link's target is unchanged."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "x.json").symlink_to(target)
    assert run_cli("--out", tmp_path / "x.pt") == 1
    assert "link" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_symlink_or_partial_file_at_tmp_name_is_harmless(tmp_path, model, smoke_cfg):
    """A symlink planted at x.pt.tmp keeps its target; a partial x.pt.tmp (disk full, killed run) blocks nothing."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "x.pt.tmp").symlink_to(target)
    (tmp_path / "y.pt.tmp").write_bytes(b"half a checkpoint")
    for name in ("x.pt", "y.pt"):
        gj.save_checkpoint(tmp_path / name, model, smoke_cfg)
        assert gj.load_checkpoint(tmp_path / name)["step"] == 0
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt", "x.pt", "x.pt.tmp", "y.pt", "y.pt.tmp"]


def test_failed_write_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, model, smoke_cfg, monkeypatch):
    """A write that fails half way (here: a full disk, as the file is synced) keeps the previous checkpoint and
    says so with the path, not with torch's internal message."""
    path = tmp_path / "m.pt"
    gj.save_checkpoint(path, model, smoke_cfg, step=3)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gj.os, "fsync", full_disk)
    with pytest.raises(OSError, match=r"no space left on device writing .*m\.pt"):
        gj.save_checkpoint(path, model, smoke_cfg, step=4)
    monkeypatch.undo()
    assert gj.load_checkpoint(path)["step"] == 3 and leftovers(tmp_path) == []


def test_unwritable_out_fails_before_training_naming_the_path(tmp_path, smoke_cfg, capsys):
    """An --out whose folder cannot be created fails at once with the path in the message, not after training."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "sub" / "x.pt"
    with pytest.raises(OSError, match=re.escape(str(blocker))):
        gj.train(smoke_cfg, ckpt_path=out, progress=False, device="cpu")
    assert run_cli("--out", out) == 1
    assert f"cannot write {out}" in capsys.readouterr().err


def test_default_names_differ_by_any_training_field():
    """--lam 0.1 then --lam 1 get two default names (no 'made with another config'); bookkeeping does not count."""
    a = gj.make_config("smoke", lam=0.1)
    names = {
        gj.default_out_path(a),
        gj.default_out_path(dataclasses.replace(a, lam=1.0)),
        gj.default_out_path(dataclasses.replace(a, num_steps=5)),
        gj.default_out_path(dataclasses.replace(a, seed=1)),
    }
    assert len(names) == 4 and all(p.suffix == ".pt" and p.parent.name == "runs" for p in names)
    assert gj.default_out_path(dataclasses.replace(a, log_every=1)) == gj.default_out_path(a)


def test_refusal_names_the_field_and_its_kind(tmp_path, model, smoke_cfg, capsys):
    """A checkpoint of another config is refused naming each field as a model field or a training field;
    the CLI adds how to get out of it."""
    path = tmp_path / "m.pt"
    gj.save_checkpoint(path, model, smoke_cfg)
    with pytest.raises(ValueError, match=r"model field width: checkpoint=64 vs config=96"):
        gj.load_checkpoint(path, dataclasses.replace(smoke_cfg, width=96))
    with pytest.raises(ValueError, match=r"training field lam: checkpoint=0\.1 vs config=1\.0"):
        gj.load_checkpoint(path, dataclasses.replace(smoke_cfg, lam=1.0), same_run=True)
    assert run_cli("--out", path, "--lam", "1") == 1
    err = capsys.readouterr().err
    assert "training field lam" in err and "pick another --out" in err


# ── the record is append-only ──


def test_rerun_appends_its_evaluation_and_keeps_the_original(tmp_path):
    """Rerunning a finished run with another planner keeps the training command, time and metrics and adds an
    evaluation; the checkpoint's time is summed over the run's processes. A unicode path works too."""
    out = tmp_path / "dossier é" / "模型.pt"
    assert run_cli("--out", out) == 0
    first = json.loads(out.with_suffix(".json").read_text())
    ckpt = torch.load(out, weights_only=True)
    assert first["kind"] == gj.RECORD_KIND and first["checkpoint"] == out.name
    assert first["train_seconds"] == ckpt["train_seconds"] > 0 and len(first["evaluations"]) == 1
    assert run_cli("--out", out, "--planner", "latent") == 0
    second = json.loads(out.with_suffix(".json").read_text())
    for key in ("command", "train_seconds", "metrics", "config", "device"):
        assert second[key] == first[key], key
    assert [e["planner"] for e in second["evaluations"]] == ["probe", "latent"]
    assert "--planner latent" in second["evaluations"][1]["command"]
    assert run_cli("--out", out, "--planner", "imagine", "--remember-bumps") == 0
    third = json.loads(out.with_suffix(".json").read_text())
    assert [e["metrics"]["remember_bumps"] for e in third["evaluations"]] == [False, False, True]
    assert third["evaluations"][2]["planner"] == "imagine" and third["metrics"] == first["metrics"]
    assert run_cli("--out", out, "--planner", "imagine", "--remember-tried") == 0
    fourth = json.loads(out.with_suffix(".json").read_text())
    assert [e["metrics"].get("remember_tried") for e in fourth["evaluations"]] == [False, False, False, True]
    assert leftovers(out.parent) == []


def test_train_seconds_are_summed_over_resumes(tmp_path, smoke_cfg):
    """A run stopped and resumed stores the training time of both parts in its checkpoint."""
    cfg = dataclasses.replace(smoke_cfg, num_steps=6, num_transitions=500, ckpt_every=3)
    path = tmp_path / "r.pt"
    first = gj.train(cfg, ckpt_path=path, stop_after=3, progress=False, device="cpu")
    part = torch.load(path, weights_only=True)["train_seconds"]
    assert first.steps_trained == 3 and part > 0
    second = gj.train(cfg, ckpt_path=path, progress=False, device="cpu")
    total = torch.load(path, weights_only=True)["train_seconds"]
    assert second.steps_trained == 3 and part < total <= second.total_train_seconds
    assert second.total_train_seconds == pytest.approx(part + second.train_seconds)


def test_another_seed_on_a_finished_output_is_refused_and_changes_nothing(tmp_path, capsys):
    """Seed 1 on seed 0's finished --out: refused by the record (naming seed), both files byte for byte intact."""
    out = tmp_path / "x.pt"
    assert run_cli("--out", out, "--seed", 0) == 0
    before = out.read_bytes(), out.with_suffix(".json").read_bytes()
    assert run_cli("--out", out, "--seed", 1) == 1
    assert "seed: record=0 vs config=1" in capsys.readouterr().err
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before


# ── one writer per output ──


def test_lock_refuses_a_live_holder_and_is_free_once_it_dies(tmp_path):
    """<out>.lock held by a live process refuses a second writer; killed, the holder's lock is gone with it
    (an OS lock: nothing stale to take over). Re-entrant within one process: leaving the inner hold keeps the lock."""
    out = tmp_path / "x.pt"
    script = f"import sys, time; sys.path.insert(0, {str(gj.REPO_ROOT)!r}); import gridjepa_utils as gj\n"
    script += f"with gj.output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=r"x\.pt is being written by another process"):
            with gj.output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    other = subprocess.run([sys.executable, "-c", script.replace("time.sleep(60)", "pass")], capture_output=True)
    with gj.output_lock(out):  # the holder is dead: its lock went with it
        with gj.output_lock(out):  # re-entrant in one process
            pass
        again = subprocess.run([sys.executable, "-c", script.replace("time.sleep(60)", "pass")], capture_output=True)
    assert other.returncode == 0, other.stderr  # free while nobody holds it
    assert again.returncode == 1 and b"being written by another process" in again.stderr, again.stderr
    assert leftovers(tmp_path) == []


def test_two_processes_on_one_output_never_mix(tmp_path):
    """Two CLI runs with different seeds and one --out at once: exactly one succeeds, the other is refused
    (by the lock, or afterwards by the config check); checkpoint and record are both the winner's."""
    out = tmp_path / "shared.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRIDJEPA_PROFILE": "smoke"}
    script = Path(gj.__file__)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *SMOKE, "--out", str(out), "--seed", str(seed)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = [rc for rc, _ in results]
    assert sorted(codes) == [0, 1], results
    winner = codes.index(0)
    loser_err = results[1 - winner][1]
    reasons = ("being written by", "another config", "other training fields")
    assert any(r in loser_err for r in reasons), loser_err
    assert torch.load(out, weights_only=True)["config"]["seed"] == winner
    assert json.loads(out.with_suffix(".json").read_text())["config"]["seed"] == winner
    assert gj.load_checkpoint(out)["step"] == 2
    assert leftovers(tmp_path) == []


# ── integrity of what is loaded ──


def test_flipped_bytes_are_detected(tmp_path, model, smoke_cfg):
    """A checkpoint with a few flipped bytes is refused with an integrity error instead of loading or resuming."""
    path = tmp_path / "m.pt"
    gj.save_checkpoint(path, model, smoke_cfg, step=0)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"integrity check|cannot be read"):
        gj.load_checkpoint(path)
    with pytest.raises(ValueError, match=r"integrity check|cannot be read"):
        gj.train(smoke_cfg, ckpt_path=path, progress=False, device="cpu")


def resave(path, **changes):
    """Edit a saved checkpoint and give it a matching checksum, as a crafted file would have."""
    ckpt = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if key == "config":
            ckpt["config"].update(value)
        else:
            ckpt[key] = value
    ckpt["checksum"] = gj.checkpoint_checksum(ckpt)
    torch.save(ckpt, path)


def test_crafted_config_is_refused_before_any_model_is_built(tmp_path, model, smoke_cfg, monkeypatch):
    """A config asking for a huge model, or with a negative lam, is refused by load_model before allocating."""
    path = tmp_path / "m.pt"
    gj.save_checkpoint(path, model, smoke_cfg)
    monkeypatch.setattr(gj, "JEPA", None)  # building a model now would fail with a TypeError
    resave(path, config={"width": 4096, "proj_hidden": 65536, "latent_dim": 8192, "heads": 4})
    with pytest.raises(ValueError, match=r"invalid config: .*parameters, above the limit"):
        lab.load_model(path)
    resave(path, config={"width": 64, "proj_hidden": 256, "latent_dim": 192, "heads": 2, "lam": -1.0})
    with pytest.raises(ValueError, match=r"Config\.lam must be >= 0"):
        lab.load_model(path)


def test_out_of_range_step_is_refused(tmp_path, model, smoke_cfg):
    """step = -100 (negative learning rates on resume) or beyond num_steps is refused on load."""
    path = tmp_path / "m.pt"
    gj.save_checkpoint(path, model, smoke_cfg)
    for step in (-100, smoke_cfg.num_steps + 1, 1.5):
        resave(path, step=step)
        with pytest.raises(ValueError, match=r"has step .*; expected an integer in \[0, 30\]"):
            gj.load_checkpoint(path)
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        gj.lr_at(-100, smoke_cfg)


def without_keys(path, *keys):
    """Rewrite a checkpoint as an older version wrote it: without some of its keys, the checksum recomputed if kept."""
    ckpt = torch.load(path, weights_only=True)
    for key in keys:
        del ckpt[key]
    if "checksum" in ckpt:
        ckpt["checksum"] = gj.checkpoint_checksum(ckpt)
    torch.save(ckpt, path)


def test_checkpoints_with_a_checksum_but_no_format_still_load(tmp_path, model, smoke_cfg):
    """Format 1 (a checksum, no format key, maybe no train time: most shipped checkpoints) loads, its training time
    kept from its metrics; every shipped checkpoint, format 1 or the current one, loads; the oldest format (no
    checksum) is refused with a message saying what to do."""
    path = tmp_path / "old.pt"
    gj.save_checkpoint(path, model, smoke_cfg, metrics={"train_seconds": 12.5})
    without_keys(path, "format", "train_seconds")
    assert gj.load_checkpoint(path)["train_seconds"] == 12.5
    formats = {}
    for shipped in sorted(lab.ASSETS.glob("*.pt")):
        formats[shipped.name] = torch.load(shipped, weights_only=True).get("format", 1)
        assert gj.load_checkpoint(shipped)["step"] > 0, shipped
    assert set(formats.values()) <= {1, gj.CHECKPOINT_FORMAT} and 1 in formats.values(), formats
    without_keys(path, "checksum")
    with pytest.raises(ValueError, match=r"fails its integrity check: edited, corrupted or pre-checksum; retrain it"):
        gj.load_checkpoint(path)


def test_a_removed_checksum_is_not_taken_for_an_old_checkpoint(tmp_path, model, smoke_cfg):
    """Deleting a checkpoint's checksum (with or without its format key) after editing it does not make it pass as
    one written before checksums existed."""
    path = tmp_path / "m.pt"
    for drop in (("checksum",), ("checksum", "format"), ("checksum", "format", "train_seconds")):
        gj.save_checkpoint(path, model, smoke_cfg)
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"]["grid_size"] = 6
        for key in drop:
            del ckpt[key]
        torch.save(ckpt, path)
        with pytest.raises(ValueError, match=r"integrity check|without a checksum"):
            gj.load_checkpoint(path)
    resave(path, format=3)
    with pytest.raises(ValueError, match=r"has format 3"):
        gj.load_checkpoint(path)


def test_retired_config_fields_load_at_their_old_values_only(tmp_path, model, smoke_cfg):
    """An old config naming stem="patch", spatial=False, rollout_frames=0, rollout_weight=0.0 loads (the fields are
    dropped); another value of them, or an unknown field, is refused by name."""
    path = tmp_path / "m.pt"
    gj.save_checkpoint(path, model, smoke_cfg)
    resave(path, config={"stem": "patch", "spatial": False, "rollout_frames": 0, "rollout_weight": 0.0})
    assert lab.load_model(path)[1] == smoke_cfg
    retired = (("stem", "conv"), ("spatial", True), ("rollout_frames", 1), ("rollout_weight", 1.0))
    for field, value in (*retired, ("colour", "red")):
        gj.save_checkpoint(path, model, smoke_cfg)
        resave(path, config={field: value})
        with pytest.raises(ValueError, match=rf"does not build \({field}"):
            lab.load_model(path)


def test_weights_must_fit_their_config(tmp_path, model, smoke_cfg):
    """A config whose shapes differ from the weights' (here a crafted proj_hidden) is refused, naming the tensor."""
    path = tmp_path / "m.pt"
    gj.save_checkpoint(path, model, smoke_cfg)
    resave(path, config={"proj_hidden": 128})
    with pytest.raises(
        ValueError, match=r"weights do not fit its config \(.*size mismatch for encoder\.projector\.net\.0\.weight"
    ):
        lab.load_model(path)


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    """A JSON file or a tensor saved with torch.save is refused as not a checkpoint."""
    (tmp_path / "a.pt").write_text("{}")
    with pytest.raises(ValueError, match=r"cannot be read"):
        gj.load_checkpoint(tmp_path / "a.pt")
    torch.save(torch.zeros(3), tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"not a GridJEPA checkpoint"):
        gj.load_checkpoint(tmp_path / "b.pt")


def test_a_folder_at_the_checkpoint_path_is_refused_before_training(tmp_path, smoke_cfg, monkeypatch):
    (tmp_path / "x.pt").mkdir()
    monkeypatch.setattr(gj, "make_transitions", lambda *a, **k: pytest.fail("trained before refusing the folder"))
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        gj.train(smoke_cfg, ckpt_path=tmp_path / "x.pt", resume=False, progress=False)
