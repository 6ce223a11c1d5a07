"""Planning: run_mpc with the reference planners, why the u_trap matters, model planners end to end."""

import sys

import pytest
import torch

import gridjepa_utils as gj

sys.path.insert(0, str(gj.REPO_ROOT / "bench"))
import lab  # noqa: E402  (study-only code: bench/lab.py)


def manhattan_greedy_policy(world):
    """Greedy with a perfect decoder: the action whose TRUE next cell is nearest to the goal in Manhattan
    distance (ties: the first action). The original write-up's planner at its best, with no model error at all."""

    def policy(cells, goals):
        nxt = world.next_cell[cells]  # (P, A)
        pos_next = torch.from_numpy(world.cell_pos(nxt.numpy()))  # (P, A, 2)
        pos_goal = torch.from_numpy(world.cell_pos(goals.numpy()))  # (P, 2)
        scores = (pos_next - pos_goal[:, None]).abs().sum(-1).float()
        return {"action": scores.argmin(1), "scores": scores}

    return policy


def check_paths_follow_the_world(world, result):
    """Every recorded step moved each active episode by world.next_cell of the chosen action."""
    paths = result.paths
    for t, rec in enumerate(result.trace):
        active = rec["active"]
        expected = world.next_cell[paths[active, t], rec["action"].long()]
        assert torch.equal(paths[active, t + 1], expected)
        assert torch.equal(paths[~active, t + 1], paths[~active, t])  # finished episodes stay at the goal


@pytest.mark.parametrize("name", sorted(gj.LAYOUTS))
def test_bfs_policy_solves_every_pair_optimally(name):
    """The BFS planner through run_mpc reaches every goal in exactly the BFS distance, on every layout."""
    world = gj.World(5, walls=name)
    result = gj.run_mpc(world, gj.bfs_policy(world), record=True)
    F = len(world.free_cells)
    assert len(result.starts) == F * (F - 1)
    assert bool(result.success.all()) and bool(result.optimal.all())
    assert torch.equal(result.steps, result.optimal_steps)
    assert torch.equal(result.paths[:, -1], result.goals)
    summary = result.summary()
    assert summary["success"] == 1.0 and summary["optimal"] == 1.0 and summary["pairs"] == F * (F - 1)
    check_paths_follow_the_world(world, result)


def test_random_policy_is_far_below_bfs(open_world):
    """Random actions solve well under 80% of the open grid's pairs in the default step budget (measured 38%)."""
    result = gj.run_mpc(open_world, gj.random_policy(seed=0))
    assert result.summary()["success"] < 0.8
    assert result.summary()["optimal"] < 0.2


def test_run_mpc_one_step_problems(open_world):
    """Every (cell, neighbour) problem on the open grid is solved in one step, landing on the goal."""
    cells = torch.arange(25).repeat_interleave(4)
    actions = torch.arange(4).repeat(25)
    goals = open_world.next_cell[cells, actions]
    moved = goals != cells
    starts, goals = cells[moved], goals[moved]
    assert len(starts) == 80
    result = gj.run_mpc(open_world, gj.bfs_policy(open_world), starts, goals, max_steps=1)
    assert torch.equal(result.steps, torch.ones(80, dtype=torch.long))
    assert torch.equal(result.paths[:, 1], goals)
    assert result.paths.shape == (80, 2)


def test_run_mpc_start_equals_goal_and_step_budget(open_world):
    """A pair whose start is its goal is solved in 0 steps; a budget too short for a pair is a failure."""
    result = gj.run_mpc(open_world, gj.bfs_policy(open_world), torch.tensor([3, 0]), torch.tensor([3, 24]), max_steps=4)
    assert result.steps.tolist() == [0, 5]  # max_steps + 1 = never
    assert result.success.tolist() == [True, False]
    assert result.paths.shape == (2, 5)
    assert int(result.paths[1, -1]) != 24


def test_plan_result_by_distance_open_grid(open_world):
    """by_distance groups the 600 open-grid pairs by BFS distance 1..8 (80 pairs are one step apart)."""
    by_d = gj.run_mpc(open_world, gj.bfs_policy(open_world)).by_distance()
    assert sorted(by_d) == list(range(1, 9))
    assert sum(v["pairs"] for v in by_d.values()) == 600
    assert by_d[1]["pairs"] == 80 and by_d[8]["pairs"] == 4  # the two pairs of opposite corners, both ways
    assert all(v["success"] == 1.0 and v["optimal"] == 1.0 for v in by_d.values())


def test_asked_once_asks_each_pair_once_and_plans_the_same():
    """asked_once keeps a planner's answer for each (cell, goal) pair: runs with every memory and a longer budget
    plan exactly as the planner asked afresh, and the planner is asked about each pair once over all of them."""
    world = gj.World(5, walls="u_trap")
    greedy, asked = manhattan_greedy_policy(world), []

    def counting(cells, goals):
        asked.extend(zip(cells.tolist(), goals.tolist()))
        return greedy(cells, goals)

    once = lab.asked_once(counting)
    for flags in ({}, {"remember_bumps": True}, {"remember_tried": True}):
        for max_steps in (None, 60):
            kept, fresh = (gj.run_mpc(world, p, max_steps=max_steps, record=True, **flags) for p in (once, greedy))
            assert torch.equal(kept.paths, fresh.paths)
            assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(kept.trace, fresh.trace))
    assert len(asked) == len(set(asked))  # a looping episode, or a rerun, asks nothing new


def test_u_trap_defeats_greedy_manhattan_even_with_a_perfect_decoder():
    """On u_trap, greedy Manhattan planning with the true next cells fails on some pairs (it pushes into
    the cup's walls), while BFS solves them all: this is why the trap layout is in the evaluation."""
    world = gj.World(5, walls="u_trap")
    greedy = gj.run_mpc(world, manhattan_greedy_policy(world))
    bfs = gj.run_mpc(world, gj.bfs_policy(world))
    assert bool(bfs.success.all())
    assert not bool(greedy.success.all())
    assert greedy.summary()["success"] < 0.9  # measured 0.73
    # the textbook case: from inside the cup (2, 2) to straight above it (2, 0)
    one = gj.run_mpc(
        world,
        manhattan_greedy_policy(world),
        torch.tensor([world.cell_index(2, 2)]),
        torch.tensor([world.cell_index(2, 0)]),
    )
    assert not bool(one.success[0])
    assert set(one.paths[0].tolist()) == {world.cell_index(2, 2)}  # it never leaves the cup's centre


def bump_steps(world, paths, goals):
    """(episode, step) of every step that left an episode where it was before reaching its goal: a wall bump."""
    stayed = (paths[:, 1:] == paths[:, :-1]) & (paths[:, :-1] != goals[:, None])
    return stayed.nonzero()


def test_remember_bumps_changes_only_episodes_that_bumped():
    """Without memory the greedy planner, once it walks into a wall, stays there to the end of the episode (same
    image, same goal, same action); with memory such episodes leave the bump cell at once and never repeat a bump,
    and episodes that never bumped follow exactly the same path."""
    world = gj.World(5, walls="u_trap")
    plain = gj.run_mpc(world, manhattan_greedy_policy(world))
    memory = gj.run_mpc(world, manhattan_greedy_policy(world), remember_bumps=True, record=True)
    bumped = torch.zeros(len(plain.starts), dtype=torch.bool)
    bumped[bump_steps(world, plain.paths, plain.goals)[:, 0]] = True
    assert bumped.any() and not bumped.all()
    assert torch.equal(plain.paths[~bumped], memory.paths[~bumped])
    for e in bumped.nonzero()[:, 0]:  # stuck: from its first bump on, the episode never moves again
        t = int(bump_steps(world, plain.paths[e : e + 1], plain.goals[e : e + 1])[0, 1])
        assert set(plain.paths[e, t:].tolist()) == {int(plain.paths[e, t])}
        assert not bool(plain.success[e])
    tried = set()  # with memory, no (episode, cell, action) that went nowhere is taken twice
    for t, rec in enumerate(memory.trace):
        for e, a in zip(rec["active"].nonzero()[:, 0].tolist(), rec["action"].tolist()):
            here = int(memory.paths[e, t])
            if int(memory.paths[e, t + 1]) == here:
                assert (e, here, a) not in tried
                tried.add((e, here, a))
    assert tried
    check_paths_follow_the_world(world, memory)
    assert memory.summary()["success"] > plain.summary()["success"]  # measured 73.2% -> 74.7%
    # memory mends a bump, not a dead end: from the cup's centre (2, 2) to (2, 0) greedy tries up, left and right
    # (all walls), then steps down and back up forever
    cup = world.cell_index(2, 2), world.cell_index(2, 0)
    mine = ((memory.starts == cup[0]) & (memory.goals == cup[1])).nonzero()[0, 0]
    assert not bool(memory.success[mine])
    assert memory.paths[mine, :4].tolist() == [cup[0]] * 4 and int(memory.paths[mine, 4]) == world.cell_index(2, 3)


def test_remember_bumps_is_per_episode():
    """Each episode remembers its own bumps only: an episode planned alone follows the path it follows among all the
    others (where other episodes bumped into the same walls earlier)."""
    world = gj.World(5, walls="u_trap")
    together = gj.run_mpc(world, manhattan_greedy_policy(world), remember_bumps=True)
    late = bump_steps(world, together.paths, together.goals)
    late = late[late[:, 1] > 0][:, 0].unique()  # episodes whose first bump comes after others have bumped there
    assert len(late)
    for e in late.tolist():
        alone = gj.run_mpc(
            world,
            manhattan_greedy_policy(world),
            together.starts[e : e + 1],
            together.goals[e : e + 1],
            max_steps=together.paths.shape[1] - 1,
            remember_bumps=True,
        )
        n = alone.paths.shape[1]  # the steps it ran; together, it waits at its goal for the others
        assert torch.equal(alone.paths[0], together.paths[e, :n])
        assert bool((together.paths[e, n:] == together.goals[e]).all())


def test_remember_tried_turns_loops_into_exploration():
    """Remembering every action taken: episodes that never come back to an image follow exactly the plain path;
    back at an image, the agent takes an action it has taken least often from there (the policy's best of those), so
    it leaves the greedy planner's dead ends, which bump memory alone does not mend."""
    world = gj.World(5, walls="u_trap")
    plain = gj.run_mpc(world, manhattan_greedy_policy(world))
    bumps = gj.run_mpc(world, manhattan_greedy_policy(world), remember_bumps=True)
    tried = gj.run_mpc(world, manhattan_greedy_policy(world), remember_tried=True, record=True)
    check_paths_follow_the_world(world, tried)
    returned = torch.tensor(
        [len(set(p[: int(s) + 1].tolist())) < min(int(s), p.shape[0] - 1) + 1 for p, s in zip(plain.paths, plain.steps)]
    )
    assert returned.any() and not returned.all()
    assert torch.equal(plain.paths[~returned], tried.paths[~returned])
    assert not bool(plain.success[returned].any())  # a plain planner back at an image loops to the end
    assert tried.summary()["success"] > bumps.summary()["success"] + 0.1  # measured 93.9% against 74.7%
    assert torch.equal(tried.optimal, plain.optimal)
    counts = {}  # each action taken was, at that moment, one taken least often from that image in that episode
    for t, rec in enumerate(tried.trace):
        for e, a in zip(rec["active"].nonzero()[:, 0].tolist(), rec["action"].tolist()):
            here = [counts.get((e, int(tried.paths[e, t]), b), 0) for b in range(len(gj.ACTIONS))]
            assert here[a] == min(here)
            counts[(e, int(tried.paths[e, t]), a)] = here[a] + 1
    # from (1, 0), above the cup, to (2, 3) below it: greedy bumps into the cup and then steps back and forth along
    # its top; remembering what it tried, it goes back along the top and round the cup's side
    dead_end = ((tried.starts == world.cell_index(1, 0)) & (tried.goals == world.cell_index(2, 3))).nonzero()[0, 0]
    assert not bool(bumps.success[dead_end]) and bool(tried.success[dead_end])


def test_a_longer_budget_plans_the_same_episodes_step_for_step():
    """bench/studies.py budget reads the share solved within b steps off one long run: that holds only if a longer
    step budget leaves every episode as it was up to the shorter one (memory and a seeded random policy included)."""
    world = gj.World(5, walls="u_trap")
    for make, memory in ((manhattan_greedy_policy, {"remember_tried": True}), (lambda w: gj.random_policy(3), {})):
        short = gj.run_mpc(world, make(world), **memory)
        budget = short.paths.shape[1] - 1
        assert budget == lab.step_budget(world, short.optimal_steps) == 2 * int(short.optimal_steps.max()) + 5
        long = gj.run_mpc(world, make(world), max_steps=3 * budget, **memory)
        assert torch.equal(long.paths[:, : budget + 1], short.paths)
        assert torch.equal(long.steps <= budget, short.success)
        assert bool((long.success & ~short.success).any())  # some pairs take longer than the budget, and get there


def test_imagination_search_remembering_bumps_solves_at_least_as_much(smoke_run, some_pairs):
    """On a trained model, remembering bumps, or every action tried, solves no fewer pairs and leaves the optimal
    ones optimal."""
    model, world = smoke_run.model, smoke_run.world
    starts, goals = some_pairs
    plain = gj.run_mpc(world, gj.imagination_policy(model, world), starts, goals)
    for memory in ("remember_bumps", "remember_tried"):
        result = gj.run_mpc(world, gj.imagination_policy(model, world), starts, goals, **{memory: True})
        assert bool((result.success | ~plain.success).all()), memory
        assert torch.equal(result.optimal, plain.optimal), memory


def test_greedy_manhattan_is_optimal_on_the_open_grid(open_world):
    """Without walls the same greedy planner is optimal: the failures above are the walls' doing."""
    result = gj.run_mpc(open_world, manhattan_greedy_policy(open_world))
    assert bool(result.optimal.all())


# ── model planners, end to end on the (untrained-quality) smoke model ──


@pytest.fixture(scope="module")
def some_pairs(open_world):
    """20 fixed (start, goal) pairs of the open grid."""
    starts, goals = open_world.all_pairs()
    pick = torch.randperm(len(starts), generator=torch.Generator().manual_seed(0))[:20]
    return starts[pick], goals[pick]


def _model_planners(run):
    model, world = run.model, run.world
    emb = gj.encode_states(model, world).cpu().numpy()
    probe = gj.fit_probe(emb, world.cell_pos(world.free_cells))
    return {
        "probe": lambda: gj.probe_policy(model, world, probe),
        "nearest": lambda: lab.nearest_cell_policy(model, world),
        "exhaustive": lambda: gj.exhaustive_policy(model, world, horizon=2),
        "cem": lambda: gj.cem_policy(model, world, horizon=2, samples=16, elites=4, iterations=2),
        "graph": lambda: gj.graph_policy(model, world),
    }


@pytest.mark.parametrize("planner", ["probe", "nearest", "exhaustive", "cem", "graph"])
def test_model_planners_run_end_to_end(smoke_run, some_pairs, planner):
    """Each model-based planner runs through run_mpc and returns well-formed results (quality not asserted:
    the smoke model is barely trained)."""
    world = smoke_run.world
    starts, goals = some_pairs
    policy = _model_planners(smoke_run)[planner]()
    out = policy(starts, goals)
    assert out["action"].shape == (20,) and out["scores"].shape == (20, 4)
    assert int(out["action"].min()) >= 0 and int(out["action"].max()) <= 3
    # the chosen action is one of the best-scored ones
    best = out["scores"].gather(1, out["action"].long()[:, None])[:, 0]
    assert torch.all(best <= out["scores"].min(1).values + 1e-6)
    result = gj.run_mpc(world, policy, starts, goals, max_steps=6, record=True)
    assert result.paths.shape == (20, 7) and result.steps.shape == (20,)
    assert torch.equal(result.paths[:, 0], starts)
    assert bool(((result.steps >= 1) & (result.steps <= 7)).all())
    assert torch.equal(result.success, result.steps <= 6)
    assert set(result.by_distance()) == set(result.optimal_steps.tolist())
    check_paths_follow_the_world(world, result)
    assert 1 <= len(result.trace) <= 6


def test_make_policy_names(smoke_run):
    """make_policy builds every named planner; 'random' ignores the model and, scoring nothing, returns no scores."""
    model, world = smoke_run.model, smoke_run.world
    for name in ("probe", "latent", "graph", "random"):
        out = gj.make_policy(name, model, world)(torch.tensor([0, 5]), torch.tensor([24, 7]))
        assert out["action"].shape == (2,), name
        assert "scores" not in out if name == "random" else out["scores"].shape == (2, 4), name


def test_graph_policy_on_a_perfect_graph_is_optimal(open_world):
    """graph_policy's BFS over imagined edges is optimal when the model's latents are the true one-hot
    cells and its predictions the true next cells (a fake model built from the world's rules)."""

    class OracleModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        @property
        def device(self):
            return torch.device("cpu")

        def encode(self, obs):  # identify the cell by its exact image
            atlas = open_world.atlas().float() / 255
            match = (obs[:, 0, None] == atlas[None]).flatten(2).all(-1)  # (B, N)
            return torch.nn.functional.one_hot(match.float().argmax(1), 25).float()

        def predict(self, emb, action):
            return torch.nn.functional.one_hot(open_world.next_cell[emb.argmax(1), action], 25).float()

    policy = gj.graph_policy(OracleModel(), open_world)
    result = gj.run_mpc(open_world, policy)
    assert bool(result.optimal.all())
