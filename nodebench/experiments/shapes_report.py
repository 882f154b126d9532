"""Tables and figures of the seed-004 shapes study, built only from the run directories.

For each study: ``<study>.md`` (the seed's layout: test accuracy by epoch per solver, ours beside
the seed's, then seconds per training epoch, NFE per batch, fixed-point iterations per step),
rows in ``shapes.csv``, and ``accuracy_by_epoch.png`` (all studies; ours solid, seed dashed).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from ..tables import mean_std

# The study's specs (solvers, studies, the seed's numbers): the driver (experiments/shapes.py)
# imports them from here, never the other way round.
SOLVERS = ("euler", "implicit_euler", "crank_nicolson")
SOLVER_TITLES = {"euler": "Explicit Euler", "implicit_euler": "Implicit Euler",
                 "crank_nicolson": "Crank-Nicolson (implicit midpoint)"}

# (dataset, training images, step) of each study; sizes of the seed, shrunk by the profile.
STUDIES = {
    "single": {"dataset": "shapes", "train_size": 2700, "step": 0.05,
               "title": "Single shapes (seed 004, section 3.1.1)"},
    "compound": {"dataset": "shapes_compound", "train_size": 2700, "step": 0.05,
                 "title": "Compound shapes (seed 004, section 3.2.1)"},
    "small500": {"dataset": "shapes", "train_size": 500, "step": 0.01,
                 "title": "500 training images, step 0.01 (seed 004, section 3.3)"},
    "small1350": {"dataset": "shapes", "train_size": 1350, "step": 0.025,
                  "title": "1350 training images, step 0.025 (seed 004, appendix 6.1)"},
    "small500c": {"dataset": "shapes_compound", "train_size": 500, "step": 0.01,
                  "title": "500 compound training images, step 0.01 (the other reading of "
                           "seed 004, section 3.3)"},
    "small1350c": {"dataset": "shapes_compound", "train_size": 1350, "step": 0.025,
                   "title": "1350 compound training images, step 0.025 (the other reading of "
                            "seed 004, appendix 6.1)"},
}

# Seed 004's tables: test accuracy (%) by epoch 1..5, and seconds per training epoch (Colab).
SEED_ACCURACY = {
    "single": {"euler": [43.483, 83.883, 96.617, 99.633, 99.633],
               "implicit_euler": [66.150, 95.067, 100.000, 100.000, 100.000],
               "crank_nicolson": [65.933, 90.717, 94.283, 94.067, 91.650]},
    "compound": {"euler": [61.617, 97.550, 98.917, 99.950, 94.567],
                 "implicit_euler": [60.217, 77.917, 96.033, 97.450, 99.417],
                 "crank_nicolson": [62.333, 94.283, 98.117, 99.800, 97.500]},
    "small500": {"euler": [33.533, 32.850, 32.883, 62.400, 63.717],
                 "implicit_euler": [33.600, 33.600, 42.067, 34.933, 43.633],
                 "crank_nicolson": [33.400, 43.717, 33.400, 70.533, 91.383]},
    "small1350": {"euler": [33.700, 61.283, 66.033, 97.900, 93.367],
                  "implicit_euler": [51.367, 58.667, 58.417, 96.083, 99.883],
                  "crank_nicolson": [32.917, 32.917, 58.100, 49.700, 90.417]},
}
SEED_EPOCH_S = {"single": {"euler": 61, "implicit_euler": 71, "crank_nicolson": 74},
                "compound": {"euler": 61, "implicit_euler": 66, "crank_nicolson": 66},
                "small500": {"euler": 93, "implicit_euler": 81, "crank_nicolson": 81},
                "small1350": {}, "small500c": {}, "small1350c": {}}


def run_name(study: str, solver: str, seed: int) -> str:
    """Run folder name: ``<study>_<solver>`` for seed 0, ``<study>_<solver>_s<seed>`` else."""
    return f"{study}_{solver}" + (f"_s{seed}" if seed else "")


def _load(run_dir: Path) -> dict | None:
    """A run's summary, per-epoch rows and iteration counts; a run stopped before its end (no
    summary.json yet) is shown with the epochs it finished and status ``incomplete``."""
    rows = []
    if (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    elif rows:
        summary = {"status": f"incomplete ({len(rows)} epochs)", "error": None,
                   "epoch_time_s": sum(float(r["epoch_time_s"]) for r in rows) / len(rows),
                   "nfe_forward": float(rows[-1]["nfe_forward"]),
                   "nfe_backward": float(rows[-1]["nfe_backward"])}
    else:
        return None
    stats_file = run_dir / "implicit_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    return {"summary": summary, "rows": rows, "stats": stats}


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _iters(stats: dict, phase: str) -> float | None:
    steps = stats.get(f"{phase}_steps", 0)
    return stats[f"{phase}_iters"] / steps if steps else None


def _mean_std(values: list[float], spec: str, unit: str = "") -> str:
    """``m`` for one value, ``m ± s (n)`` (sample std) for several, ``-`` for none."""
    return mean_std(values, spec, unit=unit, count=True)


def load_runs(runs_dir: Path, study: str, solver: str) -> list[dict]:
    """Every seed's run of ``study`` x ``solver`` found on disk, by seed (see ``run_name``)."""
    found = {}
    base = run_name(study, solver, 0)
    for d in runs_dir.glob(f"{base}*"):
        tail = d.name[len(base):]
        if tail and not (tail.startswith("_s") and tail[2:].isdigit()):
            continue
        r = _load(d)
        if r:
            found[int(tail[2:]) if tail else 0] = r
    return [found[k] for k in sorted(found)]


def study_table(study: str, runs: dict[str, list[dict]]) -> str:
    """Markdown table in the seed's layout (epochs down, solvers across), ours | seed; ours is
    the mean ± std over the seeds that reached that epoch (their count in brackets)."""
    head = "| epoch | " + " | ".join(f"{SOLVER_TITLES[s]} (ours) | (seed)" for s in SOLVERS) + " |"
    sep = "| --- |" + " --- | --- |" * len(SOLVERS)
    lines = [head, sep]
    n_epochs = max([len(r["rows"]) for rs in runs.values() for r in rs] + [5])
    for e in range(n_epochs):
        cells = []
        for s in SOLVERS:
            acc = [100.0 - float(r["rows"][e]["test_error"]) for r in runs.get(s, [])
                   if e < len(r["rows"])]
            seed = SEED_ACCURACY[study][s][e] if e < 5 and study in SEED_ACCURACY else None
            cells += [_mean_std(acc, ".3f", "%"),
                      _fmt(seed, ".3f") + ("%" if seed is not None else "")]
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")

    def extra(label: str, value_of, seed_of=lambda s: None, spec: str = ".1f") -> None:
        cells = []
        for s in SOLVERS:
            values = [v for v in (value_of(r) for r in runs.get(s, [])) if v is not None]
            cells += [_mean_std(values, spec), seed_of(s) or "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    extra("train s/epoch", lambda r: r["summary"].get("epoch_time_s"),
          lambda s: _fmt(SEED_EPOCH_S[study].get(s), "d") if s in SEED_EPOCH_S[study] else None)
    extra("NFE/batch fwd", lambda r: r["summary"].get("nfe_forward"))
    extra("NFE/batch bwd", lambda r: r["summary"].get("nfe_backward"))
    extra("iters/step fwd", lambda r: _iters(r["stats"], "forward"), spec=".2f")
    extra("iters/step bwd", lambda r: _iters(r["stats"], "backward"), spec=".2f")
    cells = []
    for s in SOLVERS:
        statuses = [r["summary"]["status"] + (f" ({r['summary']['error']})"
                                              if r["summary"].get("error") else "")
                    for r in runs.get(s, [])]
        counts = {st: statuses.count(st) for st in dict.fromkeys(statuses)}
        cells += [", ".join(f"{n} {st}" for st, n in counts.items()) or "-", "-"]
    lines.append("| runs | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_shapes(runs_dir: Path, results: Path, studies: list[str], profile: str,
                  description: str, wall_s: float) -> None:
    """Write the per-study tables, shapes.csv, the figure and README.md into ``results``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = {st: {s: load_runs(runs_dir, st, s) for s in SOLVERS} for st in studies}
    every = [r for st in loaded.values() for rs in st.values() for r in rs]
    any_run = next((r for r in every if "device" in r["summary"]), None)
    device = any_run["summary"]["device"] if any_run else "-"
    total_wall = sum(r["stats"].get("wall_s", 0.0) for r in every)
    seeds = sorted({r["summary"]["config"]["seed"] for r in every if "config" in r["summary"]})
    budget = (f"Profile `{profile}`: {description}. Adam lr 1e-3, batches 120 (train) / 300 "
              f"(test), adjoint gradients, seeds {', '.join(map(str, seeds)) or '-'} "
              f"(initialisation and batch order; the same images for every seed). Device: "
              f"{device}. Sum of run wall times {total_wall / 60:.1f} min; this driver call "
              f"{wall_s / 60:.1f} min.")
    csv_rows = []
    sections = []
    for st in studies:
        runs = loaded[st]
        cfg = next((r["summary"]["config"] for rs in runs.values() for r in rs
                    if "config" in r["summary"]), None)
        sizes = (f"{cfg['dataset']['name']}, {cfg['dataset']['train_size']} training / "
                 f"{cfg['dataset']['test_size']} test images of {cfg['dataset']['shape']['size']}"
                 f"x{cfg['dataset']['shape']['size']}, step {cfg['solver']['step_size']}, "
                 f"{cfg['trainer']['epochs']} epochs" if cfg else "no runs")
        table = study_table(st, runs)
        text = (f"## {STUDIES[st]['title']}\n\nTest accuracy by epoch, ours (measured: mean ± "
                f"std over seeds, their count in brackets) beside the seed's (copied from seed "
                f"004, single runs). {sizes}. {budget}\n\n{table}\n")
        (results / f"{st}.md").write_text(text)
        sections.append(text)
        for s in SOLVERS:
            for r in runs.get(s, []):
                for e, row in enumerate(r["rows"]):
                    csv_rows.append({
                        "study": st, "solver": s,
                        "seed": r["summary"].get("config", {}).get("seed", ""), "epoch": e + 1,
                        "test_accuracy": 100.0 - float(row["test_error"]),
                        "seed_accuracy": (SEED_ACCURACY[st][s][e]
                                          if e < 5 and st in SEED_ACCURACY else ""),
                        "train_epoch_s": row["epoch_time_s"], "nfe_forward": row["nfe_forward"],
                        "nfe_backward": row["nfe_backward"], "nfe_eval": row["nfe_eval"],
                        "status": r["summary"]["status"]})
    with open(results / "shapes.csv", "w", newline="") as fh:
        fields = ["study", "solver", "seed", "epoch", "test_accuracy", "seed_accuracy",
                  "train_epoch_s", "nfe_forward", "nfe_backward", "nfe_eval", "status"]
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(csv_rows)

    cols = min(3, len(studies))
    rows_n = -(-len(studies) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.6 * rows_n), squeeze=False)
    for ax in axes.flat[len(studies):]:
        ax.set_visible(False)
    colors = {"euler": "tab:blue", "implicit_euler": "tab:orange", "crank_nicolson": "tab:green"}
    for ax, st in zip(axes.flat, studies):
        for s in SOLVERS:
            rs = [r for r in loaded[st].get(s, []) if r["rows"]]
            if rs:
                n = min(len(r["rows"]) for r in rs)
                accs = [[100.0 - float(row["test_error"]) for row in r["rows"][:n]] for r in rs]
                acc = [statistics.fmean(col) for col in zip(*accs)]
                if len(rs) > 1:
                    ax.fill_between(range(1, n + 1), [min(c) for c in zip(*accs)],
                                    [max(c) for c in zip(*accs)], color=colors[s], alpha=0.15)
                ax.plot(range(1, len(acc) + 1), acc, "o-", color=colors[s],
                        label=f"{SOLVER_TITLES[s]} (ours)")
            if st in SEED_ACCURACY:
                ax.plot(range(1, 6), SEED_ACCURACY[st][s], "x--", color=colors[s], alpha=0.6,
                        label=f"{SOLVER_TITLES[s]} (seed)")
        ax.set_title(STUDIES[st]["title"].split(" (")[0], fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_xticks(range(1, 6))
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Seed 004 shapes study, profile {profile}: ours solid (mean over seeds, band "
                 "min..max), seed dashed", fontsize=9)
    fig.tight_layout()
    fig.savefig(results / "accuracy_by_epoch.png", dpi=120)
    plt.close(fig)

    readme = (
        "# Seed 004: Neural ODE shapes classification with explicit Euler, implicit Euler and "
        "Crank-Nicolson (implicit midpoint)\n\n"
        f"Made by `make reproduce-shapes PROFILE={profile}` (`python -m "
        f"nodebench.experiments.shapes --profile {profile}`): one `nodebench.train.run` per "
        "study and solver, run directories under `runs/shapes-<profile>/<study>_<solver>/` "
        "(summary.json, metrics.csv, TensorBoard events, implicit_stats.json); every number "
        "below is read from those files. Seed columns are copied from seed 004's tables "
        "(Colab, width-64 Honchar model; image size not stated there) and are not measured "
        "here.\n\n"
        f"{budget}\n\n"
        "Accuracy = 100 - test error after each epoch. `train s/epoch` is the training time of "
        "an epoch (evaluation excluded, as the seed's \"training time per epoch\"). NFE are "
        "calls of the dynamics per training batch, counted by forward pre-hooks (backward = "
        "the adjoint solve). Iterations per step are the fixed-point (Anderson) iterations of "
        "the implicit solvers over the whole run, forward and backward (the adjoint solve).\n\n"
        "Files: one `<study>.md` per table, `shapes.csv` (all epochs), "
        "`accuracy_by_epoch.png`.\n\n" + "\n".join(sections))
    (results / "README.md").write_text(readme)
