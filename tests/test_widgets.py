"""Headless widget tests: observers run synchronously when a control's .value is set."""

import io

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import gridjepa_utils as gj  # noqa: E402

ipywidgets = pytest.importorskip("ipywidgets")
PNG = b"\x89PNG\r\n\x1a\n"


def walk(widget):
    """The widget and all its descendants."""
    yield widget
    for child in getattr(widget, "children", ()):
        yield from walk(child)


def find(box, cls, description=None):
    matches = [w for w in walk(box) if isinstance(w, cls) and (description is None or w.description == description)]
    assert len(matches) == 1, (cls, description, matches)
    return matches[0]


def png_size(data):
    from PIL import Image

    return Image.open(io.BytesIO(data)).size


@pytest.fixture()
def explorer():
    world = gj.World(5, walls="u_trap")
    box = gj.transition_explorer(world)
    controls = {
        "col": find(box, ipywidgets.Dropdown, "col"),
        "row": find(box, ipywidgets.Dropdown, "row"),
        "action": find(box, ipywidgets.ToggleButtons),
        "image": find(box, ipywidgets.Image),
        "label": find(box, ipywidgets.HTML),
    }
    return world, controls


def choose(controls, col, row, action):
    controls["col"].value, controls["row"].value = col, row
    controls["action"].value = gj.ACTIONS.index(action)


def test_transition_explorer_shows_a_move(explorer):
    """Inside the cup (2, 2), 'down' moves to (2, 3): the label says so and the image is two frames."""
    _, c = explorer
    choose(c, 2, 2, "down")
    text = c["label"].value
    assert "before (2, 2)" in text and "--down--" in text and "after (2, 3)" in text
    assert "blocked" not in text
    assert c["image"].value[:8] == PNG
    width, height = png_size(c["image"].value)
    assert (width, height) == (2 * (2 * 128 + 6), 2 * 128)  # two frames and a gap, scaled x2


def test_transition_explorer_shows_a_wall_bump(explorer):
    """From the cup (2, 2), 'up' hits the wall (2, 1): the agent stays and the label says 'blocked'."""
    _, c = explorer
    choose(c, 2, 2, "up")
    text = c["label"].value
    assert "after (2, 2)" in text and "blocked by a wall" in text
    choose(c, 0, 0, "left")  # the board's edge stops the agent too, and is named as the edge
    assert "after (0, 0)" in c["label"].value and "blocked by the board's edge" in c["label"].value
    choose(c, 0, 0, "right")
    assert "after (1, 0)" in c["label"].value and "blocked" not in c["label"].value


def test_transition_explorer_on_a_wall_cell(explorer):
    """Choosing a wall cell (1, 1) as the start says it is a wall and hides the frame (no agent stands there);
    picking a free cell shows it again."""
    _, c = explorer
    c["col"].value, c["row"].value = 1, 1
    assert "(1, 1) is a wall" in c["label"].value
    assert c["image"].layout.display == "none"
    c["col"].value = 0
    assert "before (0, 1)" in c["label"].value and c["image"].layout.display != "none"


def test_widget_images_keep_their_natural_size(explorer):
    """The front end draws an Image at the size its width/height say: they must be the PNG's own, or it stretches."""
    _, c = explorer
    choose(c, 2, 2, "down")
    assert (int(c["image"].width), int(c["image"].height)) == png_size(c["image"].value)
    assert c["image"].layout.width == f"{png_size(c['image'].value)[0]}px"
    world = gj.World(5, walls="u_trap")
    box = gj.planning_player(world, {"bfs": gj.bfs_policy(world)}, start=world.cell_index(2, 2))
    for image in [w for w in walk(box) if isinstance(w, ipywidgets.Image)]:
        assert (int(image.width), int(image.height)) == png_size(image.value)


def test_transition_explorer_image_follows_the_state(explorer):
    """Different start cells give different images."""
    _, c = explorer
    choose(c, 0, 4, "up")
    first = c["image"].value
    choose(c, 4, 4, "up")
    assert c["image"].value != first


# ── planning player ──


@pytest.fixture()
def player():
    world = gj.World(5, walls="u_trap")
    box = gj.planning_player(world, {"bfs": gj.bfs_policy(world), "random": gj.random_policy()})
    return world, box


def test_planning_player_steps_to_the_goal(player):
    """bfs from inside the cup (2, 2) to above it (2, 0): 8 steps; stepping through them ends at 'reached the goal'."""
    world, box = player
    ctl = box.controls
    info = find(box, ipywidgets.HTML)
    ctl["start"].value = world.cell_index(2, 2)
    ctl["goal"].value = world.cell_index(2, 0)
    assert ctl["step"].value == 0 and ctl["step"].max == 8 and ctl["play"].max == 8
    assert "optimal: 8 steps" in info.value and "solved in 8" in info.value
    for t in range(ctl["step"].max + 1):
        ctl["step"].value = t
        if t < ctl["step"].max:
            assert f"step {t}/8" in info.value and "reached the goal" not in info.value
            assert "this planner has no scores" in info.value  # bfs reads the true map: it has no costs to show
    assert "reached the goal" in info.value
    images = [w for w in walk(box) if isinstance(w, ipywidgets.Image)]
    assert len(images) == 2 and all(im.value[:8] == PNG for im in images)
    result = box.state["result"]
    assert int(result.paths[0, 8]) == world.cell_index(2, 0)


def test_planning_player_play_is_linked_to_the_slider(player):
    """The Play widget drives the step slider (linked in Python, so it works without a browser)."""
    world, box = player
    ctl = box.controls
    ctl["start"].value, ctl["goal"].value = world.cell_index(0, 0), world.cell_index(4, 4)
    ctl["play"].value = 3
    assert ctl["step"].value == 3
    assert "step 3/8" in find(box, ipywidgets.HTML).value


def test_planning_player_same_start_and_goal(player):
    """start == goal shows a message instead of planning."""
    world, box = player
    ctl = box.controls
    ctl["goal"].value = ctl["start"].value
    assert "start and goal are the same cell" in find(box, ipywidgets.HTML).value
    assert box.state["result"] is None


def test_planning_player_switching_planner_replans(player):
    """Choosing another planner runs a new episode with it and rewinds to step 0."""
    world, box = player
    ctl = box.controls
    ctl["start"].value, ctl["goal"].value = world.cell_index(2, 2), world.cell_index(2, 0)
    ctl["step"].value = 4
    before = box.state["result"]
    ctl["planner"].value = "random"
    after = box.state["result"]
    assert after is not before
    assert ctl["step"].value == 0
    assert "<b>random</b>" in find(box, ipywidgets.HTML).value
    assert torch.equal(after.starts, torch.tensor([world.cell_index(2, 2)]))
    ctl["planner"].value = "bfs"
    assert "<b>bfs</b>" in find(box, ipywidgets.HTML).value and bool(box.state["result"].optimal[0])


def up_first(cells, goals):
    """A planner that always prefers "up" (scores: up < down < left < right, whatever the goal)."""
    scores = torch.arange(4.0).repeat(len(cells), 1)
    return {"action": scores.argmin(1), "scores": scores}


def test_planning_player_remember_bumps_box():
    """The "remember bumps" box replans the episode with run_mpc's memory: a planner that always prefers "up" stays
    under the cup's wall without it, and with it steps aside after one bump, saying why."""

    world = gj.World(5, walls="u_trap")
    box = gj.planning_player(world, {"up first": up_first})
    ctl, info = box.controls, find(box, ipywidgets.HTML)
    assert ctl["memory"] is find(box, ipywidgets.Checkbox, "remember bumps") and ctl["memory"].value is False
    ctl["start"].value, ctl["goal"].value = world.cell_index(2, 2), world.cell_index(2, 0)
    ctl["step"].value = 1
    assert "-> <b>up</b>" in info.value and "remembered" not in info.value
    stuck = box.state["result"].paths[0]
    assert set(stuck.tolist()) == {world.cell_index(2, 2)}
    ctl["memory"].value = True
    moved = box.state["result"].paths[0]
    assert int(moved[1]) == world.cell_index(2, 2) and int(moved[2]) == world.cell_index(2, 3)  # bump, then down
    assert ctl["step"].value == 0
    ctl["step"].value = 1
    assert "-> <b>down</b>" in info.value and "up already went nowhere from this image: remembered" in info.value
    with pytest.raises(TypeError, match=r"remember_bumps must be True or False"):
        gj.planning_player(world, {"up first": up_first}, remember_bumps=1)
    # a random policy's choice is not its scores' argmin: the note is about memory only, never about that
    noisy = gj.planning_player(world, {"random": gj.random_policy(seed=1)}, remember_bumps=True)
    notes = []
    for t in range(noisy.controls["step"].max + 1):
        noisy.controls["step"].value = t
        notes.append("remembered" in find(noisy, ipywidgets.HTML).value)
    trace = noisy.state["result"].trace
    overrides = [int(r.get("policy_action", r["action"])[0]) != int(r["action"][0]) for r in trace]
    assert notes[: len(trace)] == overrides


def test_planning_player_remember_tried_box():
    """The "remember what it tried" box replans with run_mpc(remember_tried=True): back at an image, the planner
    that always prefers "up" takes an action it has taken less often from there, and the player says so."""

    world = gj.World(5, walls="u_trap")
    box = gj.planning_player(world, {"up first": up_first})
    ctl, info = box.controls, find(box, ipywidgets.HTML)
    assert ctl["tried"] is find(box, ipywidgets.Checkbox, "remember what it tried") and ctl["tried"].value is False
    ctl["start"].value, ctl["goal"].value = world.cell_index(2, 2), world.cell_index(2, 0)
    ctl["tried"].value = True
    path = box.state["result"].paths[0]
    assert path[:3].tolist() == [world.cell_index(2, 2), world.cell_index(2, 2), world.cell_index(2, 3)]
    ctl["step"].value = 1
    assert "-> <b>down</b>" in info.value and "back at this image: up was taken from it more often" in info.value
    with pytest.raises(TypeError, match=r"remember_tried must be True or False"):
        gj.planning_player(world, {"up first": up_first}, remember_tried="no")


def test_planning_player_names_ruled_out_actions():
    """A planner's infinite cost (an action it rules out) reads as 'ruled out', not as 'inf'."""
    world = gj.World(5)

    def no_up(cells, goals):
        scores = torch.tensor([[float("inf"), 1.0, 2.0, 3.0]]).repeat(len(cells), 1)
        return {"action": scores.argmin(1), "scores": scores}

    box = gj.planning_player(world, {"no up": no_up}, start=0, goal=5)
    info = find(box, ipywidgets.HTML).value
    assert "up: ruled out" in info and "down: 1.00" in info and "inf" not in info
