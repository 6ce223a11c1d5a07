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
