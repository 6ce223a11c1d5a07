"""What the notebooks teach, pinned: causality of the predictor, SIGReg against its formula, AdaLN's modulate,
CEM improving over its iterations; and the helpers the notebooks lean on (load_run, show_source, profiles)."""



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
