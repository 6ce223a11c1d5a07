"""RESULTS.md and README's headline table, written from the study results and run records in assets/.

    python bench/report.py           # write RESULTS.md, assets/figures/*.png and README's headline table
    python bench/report.py --check   # exit 1, with a summary of the differences, if either text would change

Every number in the text is read from a JSON file; each table row names the row id it comes from.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import results  # noqa: E402

ASSETS, FIGURES = ROOT / "assets", ROOT / "assets" / "figures"
RESULTS_MD, README = ROOT / "RESULTS.md", ROOT / "README.md"
OLD_RULES = ("undo", "radius")  # imagination bump rules since removed from the module


def rule(row: dict) -> str:
    """The bump rule a row was planned with: rows since the module kept one rule name none ("consistent")."""
    return row.get("imagine_rule") or "consistent"


MARKERS = ("<!-- headline:start -->", "<!-- headline:end -->")
OLD_SET = "old held-out set (contained turned/mirrored training layouts)"  # layouts-study rows without heldout_split


def pct(x, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.{digits}f}%"


def num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def rows_of(study: str) -> list[dict]:
    return results.load(ASSETS / f"{study}.json")["rows"]


def record(name: str) -> dict:
    return json.loads((ASSETS / f"{name}.json").read_text())


def ids(rows: list[dict]) -> str:
    """The ids of rows that differ only in their seed, as one pattern: layouts-...-s{0,1,2}."""
    stems = dict.fromkeys(re.sub(r"-s\d+(?=$|-)", "-s{}", r["id"]) for r in rows)
    seeds = ",".join(dict.fromkeys(str(r.get("seed", 0)) for r in rows))
    out = [s.format("{" + seeds + "}" if "," in seeds else seeds) for s in stems]
    return "<br>".join(f"`{s}`" for s in out)


def provenance(rows: list[dict]) -> str:
    devices = ", ".join(dict.fromkeys(r["device"] for r in rows))
    commits = ", ".join(f"`{c[:8]}`" for c in dict.fromkeys(r["commit"] for r in rows))
    commands = "<br>".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows))
    return f"*Provenance* — device: {devices}; commits: {commits}; commands:<br>{commands}"


class Figures:
    """Collects the figures a run draws; written to assets/figures/<name>.png (small, bytes stable)."""

    def __init__(self, write: bool):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.write = plt, write
        plt.rcParams.update({"font.size": 8, "svg.hashsalt": "gridjepa"})

    def save(self, fig, name: str) -> str:
        if self.write:
            FIGURES.mkdir(parents=True, exist_ok=True)
            fig.savefig(FIGURES / f"{name}.png", dpi=80, metadata={"Software": None}, bbox_inches="tight")
        self.plt.close(fig)
        return f"![{name}](assets/figures/{name}.png)"


# ── the headline: the original write-up's claims beside what was measured ──


def headline() -> str:
    cpu = record("gridjepa_cpu")["metrics"]
    cpu_rec = record("gridjepa_cpu")
    geo = [
        r for r in rows_of("geometry_study") if r["overrides"] == {"num_steps": 300, "smooth_weight": 0.0, "lam": 10.0}
    ]
    obstacles = [r for r in rows_of("layouts_geometry") if r["overrides"] == {}]
    lay = {r["id"]: r for r in rows_of("layouts_study")}
    sym = [r for r in lay.values() if r.get("heldout_split") == "symmetry"]  # held-out layouts new up to symmetry
    five = [r for r in sym if r["id"].startswith("layouts-g5-nunlimited-steps7500-s")]
    eight = [r for r in sym if r["id"].startswith("layouts-g8-nunlimited-steps20000-t500k-in64-p16-crop-flat")]
    per_seed = lambda rows, key: " / ".join(pct(r[key]) for r in rows)
    f = "`assets/gridjepa_cpu.json`"
    rows = [
        [
            "600/600 start→goal pairs planned optimally (greedy probe planner, 5×5)",
            f"{pct(cpu['plan_optimal'])} optimal, {pct(cpu['plan_success'])} solved",
            f,
            "`metrics.plan_optimal`",
        ],
        ["100/100 next states predicted", pct(cpu["next_state_accuracy"]), f, "`metrics.next_state_accuracy`"],
        [
            "PCA of the latents: 25 clusters on a lattice",
            f"PC1 + PC2 {pct(cpu['pc1_plus_pc2'], 0)} of the variance; Spearman ρ {num(cpu['spearman_l2_grid'], 2)}"
            " (latent vs grid distance)",
            f,
            "`metrics.pc1_plus_pc2`",
        ],
        [
            "Linear probe R² = 1.0 (fitted on every cell)",
            f"fit {num(cpu['probe_r2_fit'], 2)}; on held-out cells {num(cpu['probe_r2_heldout'])}",
            f,
            "`metrics.probe_r2_heldout`",
        ],
        [
            "(the write-up's objective, λ = 10, no map term)",
            f"held-out-cell R² {num(np.median([r['probe_r2_heldout'] for r in geo]), 2)} (median of {len(geo)} seeds;"
            f" ridge: mean {num(np.mean([r['probe_r2_ridge_heldout'] for r in geo]), 2)})",
            "`assets/geometry_study.json`",
            ids(geo),
        ],
        [
            "Planning by the latent cost: not tried (the probe planned)",
            f"greedy latent cost {pct(cpu['latent_greedy_success'])} solved",
            f,
            "`metrics.latent_greedy_success`",
        ],
        [
            "Obstacles: a next step",
            f"imagination search {pct(min(r['plans']['imagine']['success'] for r in obstacles))}–"
            f"{pct(max(r['plans']['imagine']['success'] for r in obstacles))} solved on"
            f" {len({r['layout'] for r in obstacles})} obstacle layouts"
            f" ({len(obstacles)} runs; bump rule: {', '.join(sorted({rule(r) for r in obstacles}))},"
            " since removed)",
            "`assets/layouts_geometry.json`",
            ids(obstacles),
        ],
        [
            "Worlds never seen: “no evidence it would generalize”",
            f"5×5 held-out layouts, none a training layout turned or mirrored: next states"
            f" {per_seed(five, 'heldout_next_state_accuracy')}; {five[0]['heldout_pairs']:,} pairs solved by"
            f" imagination search alone {per_seed(five, 'heldout_imagine_success')}"
            f" (seeds {', '.join(str(r['seed']) for r in five)})",
            "`assets/layouts_study.json`",
            ids(five),
        ],
        [
            "Scale the grid: a next step",
            f"{eight[0]['grid_size']}×{eight[0]['grid_size']} held-out layouts (new up to symmetry): the search alone"
            f" {per_seed(eight, 'heldout_imagine_success')}, remembering all it tried"
            f" {per_seed(eight, 'heldout_imagine_tried_success')} solved"
            f" (seed{'s' if len(eight) > 1 else ''} {', '.join(str(r['seed']) for r in eight)})",
            "`assets/layouts_study.json`",
            ids(eight),
        ],
        [
            "~30 min of training on an RTX PRO 6000 GPU (200 epochs)",
            f"{cpu_rec['train_seconds']:.0f} s on {cpu_rec['device']}, {cpu_rec['config']['num_steps']} steps",
            f,
            "`train_seconds`",
        ],
    ]
    return table(["The original write-up", "Measured here", "File", "Row"], rows)


# ── the studies ──


def shipped_section(fig: Figures) -> str:
    single = ["gridjepa_cpu", "gridjepa_cpu_two_rooms", "gridjepa_cpu_u_trap", "gridjepa_cpu_maze"]
    rows = []
    for name in single:
        r = record(name)
        m = r["metrics"]
        rows.append(
            [
                f"`{name}.json`",
                r["config"]["layout"],
                r["config"]["num_steps"],
                f"{r['train_seconds']:.0f}",
                pct(m["next_state_accuracy"]),
                pct(m["pc1_plus_pc2"], 0),
                num(m["probe_r2_heldout"]),
                pct(m["plan_success"]),
                pct(m["latent_greedy_success"]),
            ]
        )
    text = table(
        [
            "record",
            "layout",
            "steps",
            "train s",
            "next-state",
            "PC1+PC2",
            "held-out R²",
            "probe planner",
            "latent greedy",
        ],
        rows,
    )
    lay_rows, marks = [], []
    latest = {}  # a record's metrics are those of the run that trained; later evaluations (newer planners) append
    for name in ("gridjepa_layouts", "gridjepa_layouts_gpu", "gridjepa_layouts_8x8"):
        r = record(
            name
        )  # its latest evaluation with the planner table (lab.evaluate_unseen's, not the CLI's short one)
        tables = [e for e in r.get("evaluations") or [] if "heldout_graph_success" in e["metrics"]]
        latest[name] = (tables or r.get("evaluations") or [{"metrics": r["metrics"], "time": "at training"}])[-1]
        m = latest[name]["metrics"]
        marks.append(
            "¹" if "heldout_bfs_success" not in m else "²" if "heldout_bfs_success" not in r["metrics"] else ""
        )
        lay_rows.append(
            [
                f"`{name}.json`{marks[-1]}",
                "{0}×{0}".format(r["config"]["grid_size"]),
                r["device"],
                f"{r['train_seconds'] / 60:.1f}",
                latest[name].get("time", "")[:10],
                pct(m["heldout_next_state_accuracy"]),
                pct(m["heldout_imagine_success"]),
                pct(m.get("heldout_imagine_tried_success", float("nan"))),
                pct(m.get("heldout_graph_success")),
                pct(m.get("heldout_probe_success")),
                pct(m.get("heldout_random_success")),
                pct(m.get("named_imagine_success")),
            ]
        )
    text += (
        "\n\nThe shipped worlds-never-seen models on held-out layouts, as their latest evaluation measured them "
        "(imagine: planning from the two images alone; + tried: remembering what it tried; graph: the privileged "
        "imagined graph):\n\n"
    )
    text += table(
        [
            "record",
            "board",
            "trained on",
            "train min",
            "evaluated",
            "next-state",
            "imagine",
            "+ tried",
            "graph",
            "probe",
        ]
        + ["random", "named: imagine"],
        lay_rows,
    )
    notes = {"¹": f"scored on the {OLD_SET}", "²": "trained before the held-out layouts became new up to symmetry"}
    notes["²"] += " (its training layouts may include turned or mirrored held-out ones)"
    text += "".join(f"\n\n{k} {v}." for k, v in notes.items() if k in marks)
    commands = "<br>".join(f"`{record(n)['command']}`" for n in single)
    commands += "".join(f"<br>`{latest[n].get('command', record(n)['command'])}`" for n in latest)
    return text + f"\n\n*Provenance* — commands:<br>{commands}"


def benchmark_section(fig: Figures) -> str:
    b, gpu = record("benchmark"), record("gpu_benchmark")
    rows = [
        [k.removesuffix("_cpu"), f"{v['steps_per_s']:.1f}", f"{v['images_per_s']:,.0f}", f"{v['params']:,}"]
        for k, v in b["training"].items()
    ]
    text = f"Training speed on {b['device']}:\n\n" + table(["profile", "steps/s", "images/s", "parameters"], rows)
    text += f"\n\nOn {gpu['device']} (torch {gpu['torch']}):\n\n"
    if "runs" in gpu:  # bench/gpu_check.py's report: eager and compiled side by side, trained runs
        calls = ", ".join(f"`{c['command']}` at `{c['commit'][:8]}`" for c in gpu["calls"])
        return (
            text
            + gpu_section(gpu)
            + f"\n\n*Provenance* — `assets/benchmark.json`, `assets/gpu_benchmark.json` ({calls})"
        )
    rows = [
        [
            k,
            f"{v['steps_per_s']:.1f}",
            f"{v['images_per_s']:,.0f}",
            f"{v['parameters']:,}",
            f"{v['full_run_estimate_s']:.0f}",
        ]
        for k, v in gpu["profiles"].items()
    ]
    if "config" not in gpu.get("train", {}):  # written before results carried their config: flagged, not trusted
        text += (
            "*Stale:* this file predates the profiles' current recipes and records no config or commit; "
            "`bench/gpu_check.sh` on a GPU rewrites it.\n\n"
        )
    text += table(["profile", "steps/s", "images/s", "parameters", "full run, s (estimated)"], rows)
    t = gpu["train"]
    text += (
        f"\n\nThe `{t['profile']}` profile trained there in {t['train_seconds']:.0f} s: next-state"
        f" {pct(t['next_state_accuracy'])}, held-out probe R² {num(t['probe_r2_heldout'])}, probe planner"
        f" {pct(t['plan_success'])} solved."
    )
    return text + f"\n\n*Provenance* — `assets/benchmark.json`, `assets/gpu_benchmark.json` (`{gpu['command']}`)"


def gpu_section(gpu: dict) -> str:
    """bench/gpu_check.py's report as two tables: each profile's training step eager and compiled, then the runs
    trained end to end with each objective."""

    def speed(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if row.get("status") == "done" and row[key] is not None else row.get("status", "–")

    rows = []
    for k, v in gpu["profiles"].items():
        e, c = v["eager"], v["compiled"]
        ratio = f"{v['compiled_over_eager']:.2f}x" if "compiled_over_eager" in v else "–"
        gflop = f"{v['flops_per_step'] / 1e9:.1f}" if "flops_per_step" in v else "–"
        mfu = [pct(r["mfu"], 2) if r.get("status") == "done" else r.get("status") for r in (e, c)]
        rows.append([k, f"{v['parameters']:,}", gflop, speed(e, "steps_per_s", ".1f"), speed(c, "steps_per_s", ".1f")])
        rows[-1] += [ratio, speed(e, "images_per_s", ",.0f"), speed(c, "images_per_s", ",.0f"), *mfu]
        rows[-1] += [speed(c, "warmup_seconds", ".0f")]
    head = ["profile", "parameters", "GFLOP/step", "eager steps/s", "compiled steps/s", "compiled/eager"]
    head += ["eager images/s", "compiled images/s", "eager MFU", "compiled MFU", "compile warm-up, s"]
    text = "A training step eager and through `torch.compile` (MFU: achieved over the peak dense bf16 FLOP/s):\n\n"
    text += table(head, rows)
    objective = {"recipe": "the profile's", "writeup": "the original write-up's (lam 10, no smoothing)"}
    rows = []
    for r in gpu["runs"].values():
        steps = f"{r['num_steps']:,}" + (
            f" of {r['recipe_num_steps']:,}" if r["num_steps"] < r["recipe_num_steps"] else ""
        )
        row = [f"`{r['id']}`", r["profile"], objective[r["objective"]], r["path"], steps]
        if r["status"] != "done":
            rows.append(row + [f"{r['status']}: {r.get('why') or r.get('error', '')}"] + ["–"] * 5)
            continue
        row += [f"{r['train_seconds']:.0f}", pct(r["next_state_accuracy"]), num(r["pc1_plus_pc2"], 2)]
        rows.append(row + [num(r["probe_r2_heldout"]), pct(r["plan_success"]), pct(r["latent_greedy_success"])])
    head = ["run", "profile", "objective", "path", "steps", "train s", "next-state", "PC1+PC2", "held-out R²"]
    text += "\n\nTrained end to end there and evaluated:\n\n" + table(head + ["probe plans", "latent plans"], rows)
    return text


def probes_section(fig: Figures) -> str:
    rows = rows_of("probe_study")
    out = [
        [
            f"`{r['id']}`",
            r["row"],
            f"{r['trained']['heldout_mean']:.2f} ± {r['trained']['heldout_std']:.2f}",
            num(r["trained"]["ridge_heldout_mean"], 2),
            num(r["untrained"]["heldout_mean"], 2),
            num(r["untrained"]["ridge_heldout_mean"], 2),
            pct(r["plan_success"]),
            f"{r['train_seconds']:.0f}",
        ]
        for r in rows
    ]
    text = table(
        ["id", "row", "held-out R² (plain)", "ridge", "untrained", "untrained ridge", "probe plans", "train s"], out
    )
    f, ax = fig.plt.subplots(figsize=(7, 3.2))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["trained"]["ridge_heldout_mean"] for r in rows], 0.4, label="trained")
    ax.barh(y + 0.2, [r["untrained"]["ridge_heldout_mean"] for r in rows], 0.4, label="untrained encoder")
    ax.set(yticks=y, yticklabels=[r["row"] for r in rows], xlabel="held-out-cell probe R² (ridge)", xlim=(-0.5, 1))
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    return text + "\n\n" + fig.save(f, "probes") + "\n\n" + provenance(rows)


def group(rows: list[dict], key) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def geometry_section(fig: Figures) -> str:
    rows = rows_of("geometry_study")
    groups = group(rows, lambda r: r["row"])
    metrics = [
        ("PC1+PC2", lambda r: r["pc1"] + r["pc2"]),
        ("Spearman", lambda r: r["spearman_l2_grid"]),
        ("held-out R²", lambda r: r["probe_r2_heldout"]),
        ("next-state", lambda r: r["next_state_accuracy"]),
        ("probe plans", lambda r: r["plans"]["probe"]["success"]),
        ("latent greedy", lambda r: r["plans"]["latent"]["success"]),
        ("CEM", lambda r: r["plans"]["cem"]["success"]),
        ("train s", lambda r: r["train_seconds"]),
    ]
    out = [
        [ids(rs), name, len(rs)]
        + [f"{np.mean([m(r) for r in rs]):.2f} ({np.min([m(r) for r in rs]):.2f})" for _, m in metrics]
        for name, rs in groups.items()
    ]
    text = "Mean over seeds (the lowest in brackets):\n\n"
    text += table(["ids", "recipe", "seeds"] + [n for n, _ in metrics], out)
    f, ax = fig.plt.subplots(figsize=(7, 3.2))
    for i, rs in enumerate(groups.values()):
        v = [r["pc1"] + r["pc2"] for r in rs]
        ax.plot([np.mean(v)], [i], "o", color="C0")
        ax.plot(v, [i] * len(v), ".", color="C0", alpha=0.4)
    ax.set(yticks=range(len(groups)), yticklabels=list(groups), xlabel="PC1 + PC2 (share of variance; dots: seeds)")
    ax.invert_yaxis()
    return text + "\n\n" + fig.save(f, "geometry") + "\n\n" + provenance(rows)


def layouts_geometry_section(fig: Figures) -> str:
    rows = rows_of("layouts_geometry")
    planners = ["probe", "latent", "cem", "search", "imagine", "graph"]
    out = []
    for (layout, name), rs in group(rows, lambda r: (r["layout"], r["row"])).items():
        out.append(
            [ids(rs), layout, name, len(rs), pct(np.mean([r["next_state_accuracy"] for r in rs]))]
            + [pct(mean([r["plans"][p]["success"] for r in rs if p in r["plans"]])) for p in planners]
        )
    return (
        "Mean over seeds; planners' share of pairs solved:\n\n"
        + table(["ids", "layout", "recipe", "seeds", "next-state"] + planners, out)
        + "\n\n"
        + provenance(rows)
    )


def scaling_section(fig: Figures) -> str:
    rows = rows_of("scaling")
    show = ["latent greedy", "cem", "imagine", "imagine (remembers bumps)", "graph (privileged)", "probe", "random"]
    out = [
        [
            f"`{r['id']}`",
            f"{r['grid_size']}×{r['grid_size']}",
            r["layout"],
            r["num_steps"],
            f"{r['smooth_weight']:g}",
            f"{r['smooth_ramp']:g}",
            rule(r),
            num(r["final_next_state_accuracy"]),
            r["steps_to_99"] or "–",
            f"{r['train_seconds']:.0f}",
            pct(r["pc1"] + r["pc2"], 0),
        ]
        + [pct(r["plans"][n]["success"]) if n in r["plans"] else "–" for n in show]
        for r in rows
    ]
    text = table(
        ["id", "grid", "layout", "steps", "w", "ramp", "rule", "next-state", "99% at", "train s", "PC1+PC2"] + show, out
    )
    recipe = {}
    for r in rows:  # the recipe (w 5, half ramp) on each size's default schedule: the fewest steps
        if r["smooth_weight"] == 5 and r["smooth_ramp"] == 0.5:
            k = (r["grid_size"], r["layout"])
            if k not in recipe or r["num_steps"] < recipe[k]["num_steps"]:
                recipe[k] = r
    f, axes = fig.plt.subplots(1, 3, figsize=(10, 3))
    for layout, ls in (("open", "-"), ("walls 10%", "--")):
        rs = sorted((r for r in recipe.values() if r["layout"] == layout), key=lambda r: r["grid_size"])
        sizes = [r["grid_size"] for r in rs]
        axes[0].plot(sizes, [r["train_seconds"] for r in rs], "o" + ls, label=layout)
        for i, n in enumerate(["latent greedy", "imagine", "graph (privileged)"]):
            axes[1].plot(sizes, [r["plans"][n]["success"] for r in rs], "o" + ls, color=f"C{i}", label=f"{n}, {layout}")
        axes[2].plot(
            sizes,
            [r["plans"]["cem"]["ms_per_decision_all_pairs"] / r["plan_pairs"] for r in rs],
            "o" + ls,
            label=layout,
        )
    axes[0].set(title="CPU seconds of training", xlabel="grid side")
    axes[1].set(title=f"share of {rows[-1]['plan_pairs']} pairs solved", xlabel="grid side", ylim=(0, 1.05))
    axes[2].set(title="CEM: ms per pair per decision", xlabel="grid side")
    axes[0].legend()
    axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return text + "\n\n" + fig.save(f, "scaling") + "\n\n" + provenance(rows)


LAYOUT_SERIES = [
    ("next-state", "heldout_next_state_accuracy"),
    ("imagine", "heldout_imagine_success"),
    ("optimal", "heldout_imagine_optimal"),
    ("remembering all it tried", "heldout_imagine_tried_success"),
    ("graph (privileged)", "heldout_graph_success"),
    ("greedy probe", "heldout_probe_success"),
    ("random", "heldout_random_success"),
]


def short_label(r: dict) -> str:
    over = results.slug(r["overrides"], empty="")
    return (
        f"{r['layouts']} layouts, {r['num_steps']:,} steps"
        + (", GPU" if "cpu" not in r["trained_on"] else "")
        + (f", {over}" if over else "")
        + f", seed {r['seed']}"
        + (", held-out new up to symmetry" if r.get("heldout_split") else "")
    )


def layouts_speed_section(fig: Figures) -> str:
    rows = rows_of("layouts_speed")
    keys = [("next-state", "heldout_next_state_accuracy"), ("imagine", "heldout_imagine_success")]
    keys += [("+ bumps", "heldout_imagine_memory_success"), ("graph", "heldout_graph_success")]
    keys += [("probe", "heldout_probe_success")]
    out = []
    for r in rows:
        b = r["baseline"]
        out.append(
            [f"`{r['id']}`", f"`{b['id']}`", f"{b['train_seconds']:.0f} → {r['train_seconds']:.0f}"]
            + [f"{b['train_seconds'] / r['train_seconds']:.2f}×"]
            + [f"{pct(b[k])} → {pct(r[k])} ({100 * (r[k] - b[k]):+.2f})" for _, k in keys]
        )
    head = ["id", "baseline row", "train s", "speed-up"] + [f"{n} (points)" for n, _ in keys]
    text = "Each seed of the `layouts` recipe retrained with the faster code, scored on the held-out set its baseline"
    text += " row was scored on (the baseline: the same recipe and seed at the baseline's commit):\n\n"
    return text + table(head, out) + "\n\n" + provenance(rows)


def layouts_section(fig: Figures) -> str:
    rows = rows_of("layouts_study")
    out = [
        [f"`{r['id']}`", f"{r['train_seconds'] / 60:.1f}", rule(r)] + [pct(r.get(k)) for _, k in LAYOUT_SERIES]
        for r in rows
    ]
    pairs = rows[-1]["heldout_pairs"]
    text = f"On the held-out layouts ({pairs:,} pairs); planned with each row's bump rule (`rule`):\n\n"
    text += table(["id", "train min", "rule"] + [n for n, _ in LAYOUT_SERIES], out)
    shown = [r for r in rows if rule(r) not in OLD_RULES]
    f, axes = fig.plt.subplots(2, 1, figsize=(8, 9), gridspec_kw={"height_ratios": (4, 9)})
    for ax, size in zip(axes, (5, 8), strict=True):
        rs = [r for r in shown if r["grid_size"] == size]
        y = np.arange(len(rs))
        for i, (label, key) in enumerate(LAYOUT_SERIES):
            ax.barh(y + (i - 3) * 0.12, [r.get(key) or np.nan for r in rs], 0.12, label=label)
        ax.axvline(1, color="k", ls=":", lw=0.8)
        ax.set(
            yticks=y,
            yticklabels=[short_label(r) for r in rs],
            xlim=(0, 1.02),
            title=f"{size}×{size}: held-out layouts, {rs[0]['heldout_pairs']:,} pairs (rule: consistent)",
        )
        ax.invert_yaxis()
    axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=4, frameon=False)
    return text + "\n\n" + fig.save(f, "layouts") + "\n\n" + provenance(rows)


def memory_section(fig: Figures) -> str:
    rows = [r for r in rows_of("layouts_study") if "heldout_imagine_tried_success" in r]
    keys = [
        ("no memory", "imagine"),
        ("remembering bumps", "imagine_memory"),
        ("remembering all it tried", "imagine_tried"),
    ]
    out = [
        [f"`{r['id']}`", num(r["heldout_next_state_accuracy"])]
        + [pct(r.get(f"heldout_{k}_success")) for _, k in keys]
        + [pct(r["heldout_graph_success"]), pct(r["heldout_imagine_optimal"])]
        + [pct(r.get(f"named_{k}_success")) for _, k in keys]
        for r in rows
    ]
    text = table(
        ["id", "next-state"] + [n for n, _ in keys] + ["graph", "optimal"] + [f"named: {n}" for n, _ in keys], out
    )
    return text + "\n\n" + provenance(rows)


PLANNERS = [("imagine", "imagine"), ("probe", "probe"), ("graph (privileged)", "graph"), ("random", "random")]
MEMORIES = [("", ""), (" + bump memory", "_memory"), (" + tried memory", "_tried")]


def spread(rows: list, key: str) -> str:
    """A share's mean over rows (seeds), each row's beside it in order: 93.1% (92.0 / 94.2 / 93.1); a row that is
    None or lacks the key: – in its place, left out of the mean."""
    values = [None if r is None else r.get(key) for r in rows]
    have = [v for v in values if v is not None]
    each = " / ".join("–" if v is None else f"{100 * v:.1f}" for v in values)
    return pct(mean(have)) + (f" ({each})" if len(values) > 1 else "") if have else "–"


def planners_section(fig: Figures) -> str:
    """The layouts-study rows with the planner table (heldout_bfs_success), per grid size and recipe: every planner
    alone and with each memory, solved and optimal at the step budget and 3x it, mean over seeds with each seed's;
    beside them the same recipe's rows on the old held-out set (their id without "-sym"), where there are some."""
    rows = rows_of("layouts_study")
    new = [r for r in rows if "heldout_bfs_success" in r]
    if not new:
        return "No layouts-study row has the planner table yet (`heldout_bfs_success`)."
    old_by_id = {r["id"]: r for r in rows if not r.get("heldout_split")}
    recipe = lambda r: (r["grid_size"], re.sub(r"-s\d+(?=$|-)", "-s{}", r["id"]))  # noqa: E731
    parts, shown = [], list(new)
    for (size, _), rs in sorted(group(new, recipe).items()):
        old = [old_by_id.get(r["id"].removesuffix("-sym")) if r.get("heldout_split") else None for r in rs]
        shown += [o for o in old if o]
        out = []
        for (label, p), (memory, m) in [*itertools.product(PLANNERS, MEMORIES), (("BFS (optimum)", "bfs"), ("", ""))]:
            key = f"heldout_{p}{m}"
            out.append(
                [label + memory] + [spread(rs, f"{key}{b}_{k}") for b in ("", "_3x") for k in ("success", "optimal")]
            )
            out[-1] += [spread(old, f"{key}_{k}") for k in ("success", "optimal")] if any(old) else []
        split = "new up to symmetry" if rs[0].get("heldout_split") == "symmetry" else OLD_SET
        before = any(r.get("trained_before_split") for r in rs)
        pairs = " / ".join(dict.fromkeys(f"{r['heldout_pairs']:,}" for r in rs))
        seeds = ", ".join(str(r["seed"]) for r in rs)
        text = f"**{size}×{size}**, {ids(rs)}: held-out layouts {split}, {pairs} pairs per seed; "
        text += f"mean over seeds {seeds} (each seed's in brackets, in that order)" if len(rs) > 1 else f"seed {seeds}"
        text += "; trained before the held-out layouts became new up to symmetry" if before else ""
        timed = [r for r in rs if (r.get("eval_seconds") or 0) >= 1]  # a shipped run's row reads its record: 0 s
        seconds = ", ".join(f"{r['eval_seconds']:.0f} s (seed {r['seed']})" for r in timed)
        text += f"; the whole evaluation (every planner below) took {seconds} on {timed[0]['device']}" if timed else ""
        head = ["planner", "solved", "optimal", "solved, 3× budget", "optimal, 3× budget"]
        head += ["solved, old set†", "optimal, old set†"] if any(old) else []
        text += ":\n\n" + table(head, out)
        if any(old):
            text += f"\n\n† {OLD_SET}: the same recipe's rows {ids([o for o in old if o])}, at the step budget"
            text += " (they have no 3×)"
        parts.append(text)
    return "\n\n".join(parts) + "\n\n" + provenance(shown)


def budget_section(fig: Figures) -> str:
    rows = rows_of("budget_study")
    names = {
        "imagine": "no memory",
        "imagine_tried": "remembering all it tried",
        "random_tried": "no model: random, remembering all it tried",
    }
    marks = (0.5, 1, 1.5, 2, 3)
    out = [
        [f"`{r['id']}`", names[n], r["budget"]] + [pct(r[f"{n}_solved_within"][round(k * r["budget"])]) for k in marks]
        for r in rows
        for n in names
    ]
    text = table(["id", "planner", "budget (steps)"] + [f"{k:g}× budget" for k in marks], out)
    f, axes = fig.plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, size in zip(axes, (5, 8), strict=True):
        rs = [r for r in rows if r["grid_size"] == size]
        for r in rs:
            x = np.arange(r["max_steps"] + 1) / r["budget"]
            for n, style in zip(names, (":", "-", "--"), strict=True):
                if n == "random_tried" and r is not rs[0]:
                    continue  # no model: one curve
                ax.plot(
                    x,
                    r[f"{n}_solved_within"],
                    style,
                    color="gray" if n == "random_tried" else f"C{r['seed']}",
                    label=names[n] + ("" if n == "random_tried" else f", seed {r['seed']}"),
                )
        ax.axvline(1, color="k", lw=0.8)
        ax.set(
            title=f"{size}×{size}: {rs[0]['pairs']:,} held-out pairs, budget {rs[0]['budget']} steps",
            xlabel="steps, in units of the budget",
        )
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False, fontsize=7)
    axes[0].set_ylabel("share solved within")
    return text + "\n\n" + fig.save(f, "budget") + "\n\n" + provenance(rows)


def readers_section(fig: Figures) -> str:
    rows = rows_of("readers_study")
    out = [
        [
            f"`{r['id']}`",
            r["row"],
            r["num_steps"],
            f"{r['train_seconds']:.0f}",
            num(r["validation_next_state_accuracy"]),
            num(r["training_layouts_next_state_accuracy"]),
        ]
        for r in rows
    ]
    text = table(["id", "encoder", "steps", "train s", "validation next-state", "training layouts"], out)
    f, ax = fig.plt.subplots(figsize=(7, 4.5))
    order = sorted(rows, key=lambda r: r["validation_next_state_accuracy"])
    y = np.arange(len(order))
    ax.barh(y, [r["validation_next_state_accuracy"] for r in order], color="C0")
    ax.set(
        yticks=y,
        yticklabels=[f"{r['row']}, seed {r['seed']}" for r in order],
        xlim=(0, 1),
        xlabel=f"next-state accuracy on validation layouts, after {order[0]['budget_seconds'] / 60:.0f} min of CPU",
    )
    return text + "\n\n" + fig.save(f, "readers") + "\n\n" + provenance(rows)


def long_runs_section(fig: Figures) -> str:
    rows = rows_of("long_runs")
    out = [
        [
            f"`{r['id']}`",
            r["row"],
            f"{r['steps_run']:,} of {r['num_steps']:,}",
            f"{r['train_seconds'] / 60:.0f}",
            num(r["curve"]["next_state_accuracy"][-1]),
        ]
        for r in rows
    ]
    text = table(["id", "encoder", "steps run", "train min", "last next-state (training curve)"], out)
    f, ax = fig.plt.subplots(figsize=(7, 3.4))
    for i, r in enumerate(rows):
        ax.plot(r["curve"]["step"], r["curve"]["next_state_accuracy"], "-", color=f"C{i}", label=r["id"])
    ax.set(xlabel="training step", ylabel="next-state accuracy (training curve)", ylim=(0, 1))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False, fontsize=7)
    return text + "\n\n" + fig.save(f, "long_runs") + "\n\n" + provenance(rows)


def transition_errors_section(fig: Figures) -> str:
    rows = rows_of("transition_errors")
    out = []
    for r in rows:
        q = r["as_stay_along_quartiles"]
        out.append(
            [
                f"`{r['id']}`",
                r.get("readers_row", "layouts study"),
                pct(r["moves_right"] / r["moves"]),
                pct(r["moves_as_stays"] / r["moves"]),
                num(q[1], 2) if q else "–",
                pct(r["bumps_right"] / r["bumps"]),
                f"{r['moves']:,}",
                f"{r['bumps']:,}",
            ]
        )
    text = table(
        [
            "id",
            "model",
            "moves right",
            "moves read as a stay",
            "stay: share of the way (median)",
            "bumps right",
            "moves",
            "bumps",
        ],
        out,
    )
    maps = [r for r in rows if "readers_row" not in r]
    f, axes = fig.plt.subplots(1, len(maps), figsize=(2.8 * len(maps), 3), squeeze=False)
    for ax, r in zip(axes[0], maps, strict=True):
        im = ax.imshow(np.array(r["move_error_by_cell"]), cmap="magma", vmin=0, vmax=1)
        ax.set_title(r["id"].removeprefix("transition-errors-").replace("-in64", "\nin64"), fontsize=7)
        ax.set(xticks=[], yticks=[])
    f.colorbar(im, ax=axes[0].tolist(), label="moves into the cell read wrong")
    return text + "\n\n" + fig.save(f, "transition_errors") + "\n\n" + provenance(rows)


def imagine_maps_section(fig: Figures) -> str:
    rows = rows_of("imagine_maps")
    pick = lambda v: " / ".join(pct(v[d - 1], 0) for d in (1, 3, 5, 10))  # noqa: E731
    out = [
        [f"`{r['id']}`", r["layouts"], f"{r['searches']:,}", pick(r["complete"]), pick(r["no_phantom"])] for r in rows
    ]
    text = table(["id", "layouts", "searches", "complete, d = 1 / 3 / 5 / 10", "no phantom, d = 1 / 3 / 5 / 10"], out)
    f, ax = fig.plt.subplots(figsize=(7, 3))
    for i, r in enumerate(r for r in rows if r["layouts"] == "held-out"):
        ax.plot(r["depth"], r["complete"], "-o", ms=3, color=f"C{i}", label=f"{r['id']}: complete")
        ax.plot(r["depth"], r["no_phantom"], "--s", ms=3, color=f"C{i}", label="… no phantom")
    ax.set(xlabel="moves from the image the search starts from (d)", ylabel="share of searches", ylim=(0, 1.02))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=7)
    return text + "\n\n" + fig.save(f, "imagine_maps") + "\n\n" + provenance(rows)


def wall_data_section(fig: Figures) -> str:
    rows = rows_of("wall_data_study")
    layouts = {r["id"]: r for r in rows_of("layouts_study")}
    alone = {(r["members"][0], r["layouts"]): r for r in rows_of("ensemble_study") if len(r["members"]) == 1}
    head = ["id", "data", "walls beside a start", "bumps", "validation: next-state", "imagine", "remembering all"]
    head += ["held-out: next-state", "imagine", "optimal", "remembering all", "train s"]
    out, shown = [], list(rows)
    for r in rows:
        base = layouts.get(f"layouts-g8-nunlimited-steps{r['num_steps']}-t500k-in64-p16-crop-flat-s{r['seed']}-sym")
        val = alone.get((r["seed"], "validation"), {})
        for name, row, v, data in (("uniform starts (today's)", base, val, "uniform"), ("wall-biased", r, r, "biased")):
            if row is None:
                continue
            v = {k.removeprefix("validation_"): x for k, x in v.items()}
            out.append(
                [f"`{row['id']}`", name, num(r[f"{data}_start_walls_adjacent"], 2), pct(r[f"{data}_wall_hit_share"])]
                + [
                    num(v.get("next_state_accuracy")),
                    pct(v.get("imagine_success")),
                    pct(v.get("imagine_tried_success")),
                ]
                + [num(row["heldout_next_state_accuracy"])]
                + [pct(row[f"heldout_imagine{k}"]) for k in ("_success", "_optimal", "_tried_success")]
                + [f"{row['train_seconds']:,.0f}"]
            )
        shown += [x for x in (base,) if x]
    note = "Validation figures of today's recipe: the ensemble study's rows of that model alone (same pairs)."
    return table(head, out) + "\n\n" + note + "\n\n" + provenance(shown)


def ensemble_section(fig: Figures) -> str:
    rows = rows_of("ensemble_study")
    name = lambda r: f"seed {r['members'][0]} alone" if len(r["members"]) == 1 else f"joined ({r['combine']})"  # noqa: E731
    keys = ("imagine_success", "imagine_optimal", "imagine_tried_success")
    out = [[f"`{r['id']}`", r["layouts"], name(r), r["pairs"], *(pct(r[k]) for k in keys)] for r in rows]
    text = table(["id", "layouts", "planner", "pairs", "imagine", "optimal", "remembering all it tried"], out)
    best = []  # per pair of members, the join chosen on the validation layouts for each memory, then held out
    for members in dict.fromkeys(tuple(r["members"]) for r in rows if len(r["members"]) > 1):
        joined = [r for r in rows if tuple(r["members"]) == members]
        for key in ("imagine_success", "imagine_tried_success"):
            pick = max((r for r in joined if r["layouts"] == "validation"), key=lambda r: r[key])
            held = next(r for r in joined if r["layouts"] == "heldout" and r["combine"] == pick["combine"])
            alone = [next(r[key] for r in rows if r["layouts"] == "heldout" and r["members"] == [m]) for m in members]
            memory = "alone" if key == "imagine_success" else "remembering all it tried"
            best.append(
                f"seeds {' + '.join(map(str, members))}, {memory}:"
                f" the validation layouts choose {pick['combine']!r}; on the held-out layouts it solves"
                f" {pct(held[key])} against {' / '.join(pct(a) for a in alone)} alone"
            )
    return text + "\n\n" + "<br>".join(best) + "\n\n" + provenance(rows)


def imagine_tuning_section(fig: Figures) -> str:
    rows = rows_of("imagine_tuning")
    models = list(dict.fromkeys(r["model"] for r in rows))
    cells = {(r["rule"], r["merge"], r["meet"], r["model"]): r["success"] for r in rows}
    settings = list(dict.fromkeys((r["rule"], r["merge"], r["meet"]) for r in rows))
    out = [
        [f"`imagine-tuning-*-{rule}-merge{merge:g}-{meet}`", rule, merge, meet]
        + [pct(cells.get((rule, merge, meet, m))) for m in models]
        for rule, merge, meet in settings
    ]
    text = "Share of pairs solved (validation layouts for the layouts models, every pair for the others):\n\n"
    return text + table(["ids", "rule", "merge", "meet"] + models, out) + "\n\n" + provenance(rows)


def recipe_tuning_section(fig: Figures) -> str:
    rows = rows_of("recipe_tuning")
    out = []
    for name, rs in group(rows, lambda r: r["row"]).items():
        out.append(
            [
                ids(rs).replace("-v0-", "-v*-"),
                name,
                len(rs),
                num(np.mean([r["next_state_accuracy"] for r in rs])),
                pct(np.mean([r["imagine"]["success"] for r in rs])),
                pct(np.mean([r["imagine (remembers bumps)"]["success"] for r in rs])),
            ]
        )
    text = "Mean over validation layouts and seeds:\n\n"
    return (
        text
        + table(["ids", "schedule", "runs", "next-state", "imagine", "remembering bumps"], out)
        + "\n\n"
        + provenance(rows)
    )


def writeup_size_section(fig: Figures) -> str:
    rows = rows_of("writeup_size")
    metrics = [
        ("next-state", lambda r: num(r["next_state_accuracy"])),
        (
            "probe plans (optimal)",
            lambda r: f"{pct(r['plans']['probe']['success'])} ({pct(r['plans']['probe']['optimal'])})",
        ),
        (
            "latent cost (optimal)",
            lambda r: f"{pct(r['plans']['latent']['success'])} ({pct(r['plans']['latent']['optimal'])})",
        ),
        ("PC1+PC2", lambda r: pct(r["pc1"] + r["pc2"], 0)),
        (
            "held-out R² (untrained)",
            lambda r: f"{num(r['probe_r2_heldout'], 2)} ({num(r['untrained']['probe_r2_heldout'], 2)})",
        ),
        ("latent std", lambda r: num(r["latent_std"], 2)),
        ("steps x batch", lambda r: f"{r['config']['num_steps']:,} x {r['config']['batch_size']}"),
        ("train s", lambda r: f"{r['train_seconds']:.0f}"),
    ]
    out = [[f"`{r['id']}`", r["row"], r["seed"]] + [m(r) for _, m in metrics] for r in rows]
    text = table(["id", "model, objective", "seed"] + [n for n, _ in metrics], out)
    return text + "\n\n" + provenance(rows)


STUDIES = [  # heading, what it measures, section
    ("Shipped models", "The checkpoints in assets/ and the run records beside them.", shipped_section),
    ("Benchmarks", "Training and planning speed.", benchmark_section),
    ("Probes", "What moves the held-out-cell linear probe R² (notebook 04).", probes_section),
    (
        "The write-up's architecture",
        "The original write-up's model (128×128 input, 4 blocks of width 192) trained on this CPU with a shortened"
        " schedule, each objective, beside the cpu model: does the map hold at its size?",
        writeup_size_section,
    ),
    (
        "Geometry",
        "What makes the latent a map: each lever against the write-up's objective, per seed.",
        geometry_section,
    ),
    (
        "Geometry on obstacle layouts",
        "The map recipe on the named obstacle layouts, with every planner.",
        layouts_geometry_section,
    ),
    (
        "Scaling",
        "Larger grids: the steps to 99% next-state accuracy, the map, and planning.",
        scaling_section,
    ),
    (
        "Worlds never seen",
        "Trained on more and more generated layouts, measured on held-out ones.",
        layouts_section,
    ),
    (
        "Layouts training speed",
        "The `layouts` recipe's training time before and after the faster training step and rendering, at equal"
        " results.",
        layouts_speed_section,
    ),
    (
        "Planners in worlds never seen",
        "Every planner alone and with each memory on the held-out layouts, new up to symmetry (none is a training"
        " layout turned or mirrored): the share of pairs solved and solved optimally within run_mpc's step budget"
        " (2 × the longest shortest path + G) and within 3× it. BFS is the optimum; graph is privileged (it encodes"
        " every free cell of a layout first).",
        planners_section,
    ),
    (
        "Memory variants",
        "The agent-only planner without memory, remembering its bumps, and remembering all it tried.",
        memory_section,
    ),
    (
        "Step budget",
        "How many steps the agent needs: the held-out pairs again with a longer step budget.",
        budget_section,
    ),
    (
        "Readers (8×8)",
        "Which encoder reads an 8×8 layout's walls best for the same CPU time.",
        readers_section,
    ),
    ("Long runs (8×8)", "The leading readers trained long: their training curves.", long_runs_section),
    ("Transition errors", "What a layouts model gets wrong on the held-out layouts.", transition_errors_section),
    ("Imagined maps", "What the imagination search imagines, against the true layouts.", imagine_maps_section),
    (
        "Wall-biased data (8×8)",
        "The 8×8 recipe trained on data whose start cells favour walls, beside today's uniform starts.",
        wall_data_section,
    ),
    (
        "Ensembles (8×8)",
        "Two layouts models of different seeds planning as one: their imagination searches joined.",
        ensemble_section,
    ),
    ("Imagination tuning", "The search's settings, chosen on validation layouts.", imagine_tuning_section),
    ("Recipe tuning", "The cpu recipe's schedule, chosen on validation layouts.", recipe_tuning_section),
]


def anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def render(write_figures: bool) -> tuple[str, str]:
    """(RESULTS.md, the README headline table)."""
    fig = Figures(write_figures)
    head = headline()
    parts = [
        "# Results",
        "",
        "Generated by `python bench/report.py` from `assets/*.json`; do not edit by hand.",
        "",
        "## Headline",
        "",
        head,
        "",
        "## Contents",
        "",
    ]
    parts += [f"- [{h}](#{anchor(h)})" for h, _, _ in STUDIES]
    for heading, intro, section in STUDIES:
        parts += ["", f"## {heading}", "", intro, "", section(fig)]
    return "\n".join(parts) + "\n", head


def readme_with(head: str) -> str:
    text = README.read_text()
    start, end = MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"{README}: the markers {start} / {end} are missing")
    before, rest = text.split(start, 1)
    return before + start + "\n" + head + "\n" + end + rest.split(end, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md or README's headline would change")
    args = parser.parse_args()
    md, head = render(write_figures=not args.check)
    readme = readme_with(head)
    targets = [(RESULTS_MD, md), (README, readme)]
    if args.check:
        stale = [(p, new) for p, new in targets if not p.exists() or p.read_text() != new]
        for path, new in stale:
            old = path.read_text().splitlines() if path.exists() else []
            diff = list(difflib.unified_diff(old, new.splitlines(), str(path.name), "generated", lineterm="", n=0))
            print(f"{path.name} is out of date ({len(diff)} diff lines):\n" + "\n".join(diff[:40]))
        sys.exit(1 if stale else 0)
    for path, new in targets:
        path.write_text(new)
    print(f"written {RESULTS_MD.name}, README's headline and {FIGURES.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
