"""RESULTS.md and README's headline table are current, every study row says where it came from, and
bench/results.py loses no row when two studies write at once."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402
import results  # noqa: E402

STUDY_FILES = sorted(p for p in (ROOT / "assets").glob("*.json") if "rows" in json.loads(p.read_text()))


@pytest.fixture(scope="module")
def rendered():
    return report.render(write_figures=False)


def test_results_md_is_current(rendered):
    md, _ = rendered
    assert (ROOT / "RESULTS.md").read_text() == md, "RESULTS.md is out of date: run python bench/report.py"


def test_readme_headline_is_current(rendered):
    _, head = rendered
    readme = (ROOT / "README.md").read_text()
    start, end = report.MARKERS
    assert readme.split(start, 1)[1].split(end, 1)[0].strip() == head.strip()


def headline_rows(head: str) -> list[list[str]]:
    lines = [line for line in head.splitlines()[2:] if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


def named_rows(file: str, row: str) -> list[dict]:
    """The rows a headline row names: ids (a pattern s{0,1,2} stands for each seed) in a study file."""
    wanted = []
    for name in re.findall(r"`([^`]+)`", row):
        seeds = re.search(r"s\{([\d,]+)\}", name)
        wanted += [name.replace(seeds.group(0), f"s{s}") for s in seeds.group(1).split(",")] if seeds else [name]
    by_id = {r["id"]: r for r in results.load(ROOT / file)["rows"]}
    missing = [w for w in wanted if w not in by_id]
    assert not missing, f"{file}: no rows {missing}"
    return [by_id[w] for w in wanted]


def shown(value: float) -> set[str]:
    """The ways report.py prints a number."""
    return {report.pct(value), report.pct(value, 0), report.num(value), report.num(value, 2), f"{value:.0f}"}


def test_every_headline_number_is_its_json_row(rendered):
    _, head = rendered
    rows = headline_rows(head)
    assert 0 < len(rows) <= 12
    for claim, measured, file, row in rows:
        file = file.strip("`")
        data = json.loads((ROOT / file).read_text())
        if "rows" not in data:  # a run record: the row names a field of it or of its metrics
            key = row.strip("`").removeprefix("metrics.")
            value = data["metrics"][key] if row.startswith("`metrics.") else data[key]
            assert shown(value) & set(re.findall(r"-?[\d.]+%?", measured)), (claim, measured, value)
            continue
        named = named_rows(file, row)
        numbers = set(re.findall(r"-?[\d.]+%?", measured))
        found = [
            r for r in named if any(shown(v) & numbers for v in json_numbers(r) if isinstance(v, float))
        ]  # each row named alone, or at least one of a pattern's
        assert found if len(named) > 1 else len(found) == 1, (claim, measured)


def json_numbers(row: dict):
    for key, value in row.items():
        if key in ("config", "overrides"):
            continue
        if isinstance(value, dict):
            yield from json_numbers(value)
        elif isinstance(value, float):
            yield value


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_every_study_row_says_where_it_came_from(path):
    data = results.load(path)
    assert data["study"] and set(data) == {"study", "rows"}
    for row in data["rows"]:
        assert all(row.get(k) for k in results.REQUIRED), (path.name, row.get("id"))
        assert isinstance(row["config"], dict) and "grid_size" in row["config"]
    ids = [r["id"] for r in data["rows"]]
    assert len(ids) == len(set(ids)), f"{path.name}: repeated ids"


WRITER = """
import sys
sys.path.insert(0, {bench!r})
import results
for i in range(40):
    results.append_rows({path!r}, [{{"id": f"{{sys.argv[1]}}-{{i}}", "config": {{}}, "device": "cpu", "commit": "x",
                                      "command": "test", "value": i}}])
"""


def test_two_writers_at_once_lose_no_row(tmp_path):
    path = tmp_path / "study.json"
    code = WRITER.format(bench=str(ROOT / "bench"), path=str(path))
    writers = [subprocess.Popen([sys.executable, "-c", code, name]) for name in ("a", "b")]
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    ids = [r["id"] for r in results.load(path)["rows"]]
    assert sorted(ids) == sorted(f"{n}-{i}" for n in "ab" for i in range(40))


def test_a_row_of_the_same_id_replaces_it_and_says_so(tmp_path, capsys):
    path = tmp_path / "study.json"
    row = {"id": "r1", "config": {}, "device": "cpu", "commit": "x", "command": "test"}
    results.append_rows(path, [row | {"value": 1}, row | {"id": "r2"}])
    results.append_rows(path, [row | {"value": 2}])
    assert [(r["id"], r.get("value")) for r in results.load(path)["rows"]] == [("r1", 2), ("r2", None)]
    assert "row r1 replaced" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rows without"):
        results.append_rows(path, [{"id": "r3"}])


def test_a_truncated_file_is_refused_and_left_as_it_is(tmp_path):
    path = tmp_path / "study.json"
    results.append_rows(path, [{"id": "r1", "config": {}, "device": "cpu", "commit": "x", "command": "test"}])
    broken = path.read_bytes()[:-20]
    path.write_bytes(broken)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        results.load(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        results.append_rows(path, [{"id": "r2", "config": {}, "device": "cpu", "commit": "x", "command": "test"}])
    assert path.read_bytes() == broken
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def planner_row(run: str, seed: int, shares: dict, split: bool = True, size: int = 5) -> dict:
    """A synthetic layouts-study row, ``shares`` over 0.5 for every planner key (BFS: 1); ``split``: the planner table
    on the new held-out set, else the keys rows on the old one have (no BFS, no 3x, no memory but imagine's)."""
    if split:
        keys = [f"heldout_{p}{m}{b}" for _, p in report.PLANNERS for _, m in report.MEMORIES for b in ("", "_3x")]
        keys += ["heldout_bfs", "heldout_bfs_3x"]
    else:
        keys = [f"heldout_{p}" for p in ("imagine", "imagine_memory", "imagine_tried", "graph", "probe", "random")]
    row = {f"{k}_{s}": 1.0 if "bfs" in k else 0.5 for k in keys for s in ("success", "optimal")}
    row |= {"id": f"{run}-s{seed}" + ("-sym" if split else ""), "grid_size": size, "seed": seed, "heldout_pairs": 2000}
    row |= {"heldout_split": "symmetry"} if split else {}
    return row | {"device": "cpu", "commit": "0123456789ab", "command": "python bench/studies.py layouts"} | shares


def planner_table(text: str, size: int) -> dict[str, list[str]]:
    """A planners table of the section's text, by its first column."""
    block = text.split(f"**{size}×{size}**", 1)[1].split("\n\n", 2)[1]
    rows = ([c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:])
    return {cells[0]: cells[1:] for cells in rows}


def test_planners_section_means_each_seed_and_keeps_old_rows_apart(monkeypatch):
    run = "layouts-g5-nunlimited-steps7500"
    new = [
        planner_row(run, s, {"heldout_imagine_success": v, "heldout_imagine_3x_success": v3})
        for s, v, v3 in ((0, 0.9, 0.95), (1, 0.8, 0.9), (2, 0.7, 0.85))
    ]
    old = [  # the same recipe on the old held-out set (seed 2 not measured there), and another recipe's row
        planner_row(run, s, {"heldout_imagine_success": v, "heldout_imagine_optimal": 0.25}, split=False)
        for s, v in ((0, 0.6), (1, 0.5))
    ] + [planner_row("layouts-g5-nunlimited-steps5000", 0, {"heldout_imagine_success": 0.123}, split=False)]
    eight = planner_row("layouts-g8-nunlimited-steps20000", 0, {"heldout_probe_tried_3x_optimal": 0.375}, size=8)
    monkeypatch.setattr(report, "rows_of", lambda study: old + new + [eight])
    text = report.planners_section(None)
    five = planner_table(text, 5)
    assert five["imagine"] == [
        "80.0% (90.0 / 80.0 / 70.0)",  # solved: the mean over seeds 0, 1, 2, each seed's in order
        "50.0% (50.0 / 50.0 / 50.0)",
        "90.0% (95.0 / 90.0 / 85.0)",  # solved within 3x the budget
        "50.0% (50.0 / 50.0 / 50.0)",
        "55.0% (60.0 / 50.0 / –)",  # the old held-out set's rows of the same recipe, seed 2's missing
        "25.0% (25.0 / 25.0 / –)",
    ]
    assert five["BFS (optimum)"][:4] == ["100.0% (100.0 / 100.0 / 100.0)"] * 4
    assert five["BFS (optimum)"][4:] == ["–", "–"]  # the old rows have no BFS figure
    assert list(five)[:3] == ["imagine", "imagine + bump memory", "imagine + tried memory"]
    assert len(five) == 13 and "12.3" not in text  # 4 planners x 3 memories + BFS; the other recipe is not shown
    assert report.OLD_SET in text and "`layouts-g5-nunlimited-steps7500-s{0,1}`" in text
    assert "`layouts-g5-nunlimited-steps7500-s{0,1,2}-sym`" in text and "mean over seeds 0, 1, 2" in text
    assert planner_table(text, 8)["probe + tried memory"] == ["50.0%", "50.0%", "50.0%", "37.5%"]  # one seed, no old
    monkeypatch.setattr(report, "rows_of", lambda study: old)  # no row has the planner table yet: one line
    assert report.planners_section(None).count("\n") == 0


def test_shipped_layouts_records_say_which_held_out_set_scored_them(monkeypatch):
    real = report.record
    latest = {"gridjepa_layouts": {"heldout_bfs_success": 1.0}, "gridjepa_layouts_gpu": {"heldout_bfs_success": 1.0}}
    trained = {"gridjepa_layouts": {"heldout_bfs_success": 1.0}}  # the gpu model: trained before the planner table

    def record(name):
        r = real(name)
        if name not in latest:
            return r
        evaluation = r["evaluations"][-1] | {"metrics": r["evaluations"][-1]["metrics"] | latest[name]}
        return r | {"metrics": r["metrics"] | trained.get(name, {}), "evaluations": [evaluation]}

    monkeypatch.setattr(report, "record", record)
    text = report.shipped_section(report.Figures(write=False))
    assert "| `gridjepa_layouts.json` |" in text and "| `gridjepa_layouts_gpu.json`² |" in text
    assert "¹" not in text and "² trained before" in text
    monkeypatch.setattr(report, "record", real)
    text = report.shipped_section(report.Figures(write=False))  # as shipped: the cpu model retrained since, the gpu not
    assert "| `gridjepa_layouts.json` |" in text and "| `gridjepa_layouts_gpu.json`¹ |" in text
    assert f"¹ scored on the {report.OLD_SET}." in text


def test_a_row_on_the_new_held_out_set_gets_an_id_of_its_own():
    import studies

    layouts = {"grid_size": 5, "layouts": "unlimited", "num_steps": 7500, "seed": 0, "overrides": {}}
    rows = {
        "layouts": layouts,
        "budget": layouts,
        "imagine-maps": layouts | {"layouts": "held-out"},
        "transition-errors": layouts,
    }
    for study, row in rows.items():
        old, new = studies.row_id(study, row), studies.row_id(study, row | {"heldout_split": "symmetry"})
        assert new == old + "-sym", study
    assert studies.row_id("layouts", layouts) == "layouts-g5-nunlimited-steps7500-s0"  # the old rows' ids unchanged
    old_eval, new_eval = {"heldout_imagine_success": 0.9}, {"heldout_bfs_success": 1.0}
    assert studies.split_fields({"metrics": new_eval}, old_eval) == {}  # a shipped run scored on the old set
    assert studies.split_fields({"metrics": new_eval}, new_eval) == {"heldout_split": "symmetry"}
    assert studies.split_fields(None) == {"heldout_split": "symmetry"}  # scored now
    assert studies.split_fields({"metrics": old_eval}) == {"heldout_split": "symmetry", "trained_before_split": True}
