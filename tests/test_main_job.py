"""The main job's paths and records: a home-relative --out, a command that can be pasted back, and a lost record
that never lets an evaluation pass for training metrics."""

import json
import shlex

import torch
from test_outputs import run_cli  # main() in this process, smoke profile, 2 steps: its exit status


def test_out_under_home_is_expanded(tmp_path, monkeypatch):
    """--out '~/x.pt' writes to the home folder, never to a folder literally named '~'."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    assert run_cli("--out", "~/x.pt") == 0
    assert (tmp_path / "home" / "x.pt").exists() and not (tmp_path / "~").exists()


def test_record_command_is_shell_quoted(tmp_path):
    """A path with spaces survives a paste back into a shell."""
    out = tmp_path / "with spaces" / "run one.pt"
    assert run_cli("--out", out) == 0
    command = json.loads(out.with_suffix(".json").read_text())["command"]
    assert shlex.split(command)[shlex.split(command).index("--out") + 1] == str(out)


def test_lost_record_never_takes_an_evaluation_for_training(tmp_path):
    """A finished run whose record was deleted, rerun with another planner, keeps the checkpoint's training metrics
    and records the new planner's figures as an evaluation only; the rebuilt record (no command) takes later reruns."""
    out = tmp_path / "r.pt"
    assert run_cli("--out", out) == 0
    trained = torch.load(out, weights_only=True)["metrics"]
    out.with_suffix(".json").unlink()
    assert run_cli("--out", out, "--planner", "random") == 0
    assert torch.load(out, weights_only=True)["metrics"] == trained
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["metrics"]["planner"] == "probe" and record["metrics"]["plan_success"] == trained["plan_success"]
    assert [e["planner"] for e in record["evaluations"]] == ["random"] and record["command"] is None
    assert run_cli("--out", out, "--planner", "latent") == 0
    assert [e["planner"] for e in json.loads(out.with_suffix(".json").read_text())["evaluations"]] == [
        "random",
        "latent",
    ]
