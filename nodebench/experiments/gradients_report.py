"""Tables and figures of `make reproduce-gradients` (issue 14), read only from the run records.

Inputs: the run records of ``nodebench reproduce gradient_modes``
(``<runs>/<dataset>_<mode>_s<seed>/``: summary.json, metrics.csv), ``<results>/tolerance.csv``
(its tolerance stage) and ``<results>/reproduce.json``. Outputs in ``<results>``: ``tables.md``,
``mnist.csv``, ``toys.csv``, ``error_vs_time.png``, ``gradient_error_vs_tolerance.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ..report import _fmt as _mean_std
from .gradients import CLAIMS, MODES, mode_of

IMAGE_DATASETS = ("mnist", "synthetic")  # the ODE-Net part of the study (synthetic: profile tiny)


def _sci(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.2e}"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def study_runs(runs: Path) -> list[tuple[str, str, dict, pd.DataFrame]]:
    """``(dataset, mode, summary, metrics)`` of every run record under ``runs`` (the preset's
    sweep folder: ``<dataset>_<mode>_s<seed>/``), the mode told by its config
    (:func:`~nodebench.experiments.gradients.mode_of`), in :data:`MODES` order, then by folder."""
    found = []
    for path in sorted(Path(runs).glob("*/summary.json")):
        summary = _read(path)
        if summary is None or not isinstance(summary.get("config"), dict):
            continue
        mode = mode_of(summary["config"])
        metrics_path = path.parent / "metrics.csv"
        if mode not in MODES or not metrics_path.exists():
            continue
        found.append((summary.get("dataset"), mode, summary, pd.read_csv(metrics_path)))
    return sorted(found, key=lambda r: MODES.index(r[1]))


def mnist_runs(runs: Path) -> list[tuple[str, dict, pd.DataFrame]]:
    """``(mode, summary, metrics)`` of each image run of the comparison (MNIST; synthetic images
    at profile tiny), in :data:`MODES` order."""
    return [(m, s, f) for d, m, s, f in study_runs(runs) if d in IMAGE_DATASETS]


def _train_seconds(metrics: pd.DataFrame) -> pd.Series:
    """Cumulative training time (s) at the end of each round: mean s/iteration x iterations."""
    return (metrics["iter_s"] * metrics["iterations"]).cumsum()


def mnist_table(found: list[tuple[str, dict, pd.DataFrame]]) -> tuple[pd.DataFrame, float]:
    """One row per mode; the equal-wall-time error is each run's test error at the last round
    whose cumulative training time is at most ``T``, the smallest total training time of all
    runs (so every mode is read at a time it reached). Returns the table and ``T`` (s)."""
    done = [(m, s, f) for m, s, f in found if s.get("status") == "ok"]
    budget = min((_train_seconds(f).iloc[-1] for _, _, f in done), default=math.nan)
    rows = []
    for mode, s, metrics in found:
        last = metrics.iloc[-1] if len(metrics) else {}
        ok = s.get("status") == "ok"
        at_t = "-"
        if ok:
            reached = metrics[_train_seconds(metrics) <= budget + 1e-9]
            at_t = f"{reached['test_error'].iloc[-1]:.2f}" if len(reached) else "(none)"
        rows.append({
            "mode": mode,
            "status": s.get("status"),
            "test error % (equal iterations)": f"{s['test_error']:.2f}" if ok else "-",
            f"test error % at {budget:.0f} s": at_t,
            "train s/iter": f"{metrics['iter_s'].mean():.2f}" if len(metrics) else "-",
            "NFE fwd / bwd": (f"{last['nfe_forward']:.1f} / {last['nfe_backward']:.1f}"
                              if len(metrics) else "-"),
            "steps acc / rej fwd": (f"{last['steps_accepted_forward']:.1f} / "
                                    f"{last['steps_rejected_forward']:.1f}"
                                    if len(metrics) and not pd.isna(last.get(
                                        "steps_accepted_forward")) else "-"),
            "activation MiB": f"{metrics['activation_mib'].max():.1f}" if len(metrics) else "-",
            "grad rel. error init": _sci(s.get("grad_rel_error_init")),
            "cosine init": _cos(s.get("grad_cosine_init")),
            "grad rel. error end": _sci(s.get("grad_rel_error_final")),
            "cosine end": _cos(s.get("grad_cosine_final")),
            "round trip (end)": _sci(last.get("validity_roundtrip_error")) if len(metrics) else "-",
            "literature": CLAIMS[mode],
        })
    return pd.DataFrame(rows), budget


def _cos(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.4f}"


def toy_runs(runs: Path) -> pd.DataFrame:
    """One row per annulus run: mode, seed, status, the last epoch's training loss, test
    accuracy and NFE per iteration, the gradient errors, wall time and mean s/iteration."""
    rows = []
    for dataset, mode, s, metrics in study_runs(runs):
        if dataset in IMAGE_DATASETS:
            continue
        last = metrics.iloc[-1] if len(metrics) else {}
        rows.append({
            "mode": mode, "seed": s.get("seed"), "status": s.get("status"),
            "final_train_loss": last.get("train_loss") if len(metrics) else None,
            "test_accuracy": s.get("test_accuracy"),
            "nfe_forward_last_epoch": last.get("nfe_forward") if len(metrics) else None,
            "nfe_backward_last_epoch": last.get("nfe_backward") if len(metrics) else None,
            **{k: s.get(k) for k in ("grad_rel_error_init", "grad_cosine_init",
                                     "grad_rel_error_final", "grad_cosine_final",
                                     "wall_time_s")},
            "iterations": int(metrics["iterations"].sum()) if len(metrics) else 0,
            "iter_s": metrics["iter_s"].mean() if len(metrics) else None})
    return pd.DataFrame(rows)


def toy_table(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for mode in MODES:
        g = frame[frame["mode"] == mode] if len(frame) else frame
        if g.empty:
            continue
        ok = g[g["status"] == "ok"]
        rows.append({
            "mode": mode, "runs ok / failed": f"{len(ok)} / {len(g) - len(ok)}",
            "final train loss (MSE)": _mean_std(ok["final_train_loss"], 4),
            "test accuracy": _mean_std(ok["test_accuracy"], 3),
            "NFE fwd / bwd (last epoch)": f"{_mean_std(ok['nfe_forward_last_epoch'], 1)} / "
                                          f"{_mean_std(ok['nfe_backward_last_epoch'], 1)}",
            "ms/iter": _mean_std(ok["iter_s"].astype(float) * 1000.0, 1),
            "grad rel. error init": _mean_std(g["grad_rel_error_init"], 4),
            "grad rel. error end": _mean_std(ok["grad_rel_error_final"], 4),
        })
    return pd.DataFrame(rows)


def tolerance_table(tol: pd.DataFrame) -> str:
    """Markdown: relative gradient error (NFE forward / backward) per mode and tolerance."""
    parts = []
    for model, g in tol.groupby("model", sort=False):
        cell = g.apply(lambda r: (f"failed: {r['failure']}" if isinstance(r["failure"], str)
                                  else f"{r['rel_error']:.1e} ({r['nfe_forward']:.0f}/"
                                       f"{r['nfe_backward']:.0f})"), axis=1)
        table = (g.assign(cell=cell).pivot(index="mode", columns="tol", values="cell")
                 .reindex([m for m in MODES if m in set(g["mode"])])
                 .sort_index(axis=1, ascending=False))  # loose to tight
        table.columns = [f"tol {c:.0e}" for c in table.columns]
        parts.append(f"### {model}\n\n{table.to_markdown()}\n")
    return "\n".join(parts)


def _figures(found, runs: Path, tol: pd.DataFrame | None, results: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, s, metrics in found:
        if len(metrics):
            axes[0].plot(_train_seconds(metrics), metrics["test_error"], "o-", label=mode)
    axes[0].set(xlabel="training time (s, one thread)", ylabel="test error (%)",
                title="ODE-Net on MNIST: test error against training time", yscale="log")
    axes[0].legend()
    labelled = set()
    for dataset, mode, _, metrics in study_runs(runs):
        if dataset in IMAGE_DATASETS or not len(metrics):
            continue
        axes[1].plot(_train_seconds(metrics), metrics["train_loss"], "o-", alpha=0.8,
                     color=f"C{MODES.index(mode)}", label=None if mode in labelled else mode)
        labelled.add(mode)
    axes[1].set(xlabel="training time (s, one thread)", ylabel="train loss (MSE, epoch mean)",
                title="annulus NODE: loss against training time", yscale="log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(results / "error_vs_time.png", dpi=120)
    plt.close(fig)
    made.append("error_vs_time.png")
    if tol is not None and len(tol):
        models = list(dict.fromkeys(tol["model"]))
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            g = tol[tol["model"] == model]
            for mode in MODES:
                r = g[(g["mode"] == mode) & g["rel_error"].notna()]
                if len(r):
                    ax.plot(r["tol"], r["rel_error"], "o-", label=mode,
                            color=f"C{MODES.index(mode)}")
            ax.set(xscale="log", yscale="log", xlabel="rtol = atol", ylabel="relative error of "
                   "the parameter gradient", title=f"{model}, at initialisation")
            ax.invert_xaxis()
            ax.legend()
        fig.tight_layout()
        fig.savefig(results / "gradient_error_vs_tolerance.png", dpi=120)
        plt.close(fig)
        made.append("gradient_error_vs_tolerance.png")
    return made


def report(runs: Path, results: Path, profile: str = "cpu") -> None:
    """Write the comparison's tables and figures into ``results`` (see the module docstring);
    the budget line is the profile's ``reproduce.description`` (conf/experiment/gradient_modes.yaml
    and its profiles)."""
    from .. import config as C
    from ..report import schedule_line

    runs, results = Path(runs), Path(results)
    results.mkdir(parents=True, exist_ok=True)
    description = str(C.compose(["experiment=gradient_modes", f"profile={profile}"])
                      .reproduce.description).strip()
    found = mnist_runs(runs)
    table, budget = mnist_table(found)
    toys = toy_runs(runs)
    tol_path = results / "tolerance.csv"
    tol = pd.read_csv(tol_path) if tol_path.exists() else None
    header = [f"# Gradient modes compared (profile `{profile}`)", "",
              f"Budget: {description}.", schedule_line(results)]
    if found:
        s0, iterations = found[0][1], int(found[0][2]["iterations"].sum())
        header.append(f"MNIST runs: {s0.get('train_size')} training / {s0.get('test_size')} test "
                      f"images, {iterations} iterations, device {s0.get('device')}, "
                      f"{s0.get('threads')} thread(s); equal wall time T = {budget:.0f} s of "
                      "training (the fastest mode's total).")
    text = ["\n".join(h for h in header if h is not None), "",
            "## Table-1 ODE-Net on MNIST, one row per gradient mode", "",
            table.to_markdown(index=False) if len(table) else "(no runs)", ""]
    table.to_csv(results / "mnist.csv", index=False)
    if len(toys):
        tt = toy_table(toys)
        tt.to_csv(results / "toys.csv", index=False)
        text += ["## ANODE's annulus, NODE, mean ± std over seeds", "",
                 tt.to_markdown(index=False), ""]
    if tol is not None:
        text += ["## Gradient error against tolerance, at initialisation", "",
                 ("Relative error of the parameter gradient against a float64 dopri5 1e-9 "
                  "direct-backprop reference on one fixed batch (NFE forward / backward)."), "",
                 tolerance_table(tol)]
    figures = _figures(found, runs, tol, results)
    text += ["Figures: " + ", ".join(f"`{f}`" for f in figures), ""]
    (results / "tables.md").write_text("\n".join(text))
    print(f"[report] wrote {results / 'tables.md'}", flush=True)
