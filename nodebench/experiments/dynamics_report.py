"""The report of ``nodebench reproduce seed001_dynamics``: learning dynamical systems with an
ODE-Net (seed 001; docs/reference.md section 3, item 001), built from run records alone.

Every run is an ordinary ``nodebench train`` run (preset ``conf/experiment/seed001_dynamics.yaml``;
dataset ``ode_<system>`` with ``dataset.sampling``, model ``ode_small`` / ``ode_deep``, task
:class:`nodebench.tasks.TrajectoryFit`): an ODE-Net dy/dt = f(y) fitted to one trajectory of a
ground-truth system of :mod:`nodebench.dynamics` on the first ``train_fraction`` of its time
range, then solved from y0 over the whole range; the MSE against the truth is measured in the
training window (fit) and after it (extrapolation), and divided by the variance of the truth in
the same window (``fit_rel``, ``extrap_rel``: dimensionless).

:func:`report` reads each run's ``summary.json``, ``metrics.csv`` and ``trajectory.pt`` and writes
``dynamics.md`` / ``dynamics.csv`` (one row per system, network and sampling: mean ± std over
the seeds), ``runs.csv`` (one row per run), one figure per system (phase portrait and time
series, true vs learned), ``errors.png`` and ``README.md`` with a verdict on each of the seed's
claims computed from the numbers (criterion: :data:`FAIL_REL`, :data:`HORRIBLE_REL`).
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import pandas as pd
import torch

from ..tables import max_load, mean_std, quiet_verdict

SAMPLINGS = ("regular", "irregular")
SYSTEM_ORDER = ["spiral", "random_matrix", "lotka_volterra", "nonlinear", "nn_field"]
NETWORK_ORDER = ["small", "deep"]

# A run "fails" to learn a system when the mean squared error of its full-range solve exceeds
# FAIL_REL x the variance of the true trajectory in the same window (variance averaged over the
# two components), and "fails horribly" above HORRIBLE_REL (no better than the constant mean).
FAIL_REL = 0.1
HORRIBLE_REL = 1.0


@cache
def _system(name: str, points: int | None, seed: int):
    from ..dynamics import make_system

    return make_system(name, points=points, seed=seed)


def _run_row(path: Path, root: Path) -> dict | None:
    """One run record as a row of the report (None when it is not a dynamics run)."""
    from ..dynamics import NETWORK_TEXT

    s = json.loads(path.read_text())
    cfg = s.get("config") or {}
    data, model = cfg.get("dataset") or {}, cfg.get("model") or {}
    task = data.get("task") or {}
    if "system" not in data or not str(model.get("name", "")).startswith("ode_"):
        return None
    trainer, solver, optim = cfg.get("trainer") or {}, cfg.get("solver") or {}, cfg.get("optim") or {}
    system = _system(data["system"], data.get("points"), int(data.get("system_seed", 0)))
    train_end = system.train_end(float(data.get("train_fraction", 0.75)))
    network = str(model["name"]).removeprefix("ode_")
    row = {
        "system": data["system"], "network": network,
        "network_text": NETWORK_TEXT.get(network, str(model.get("hidden"))),
        "sampling": data.get("sampling"), "seed": s.get("seed"), "status": s.get("status"),
        "error": s.get("error"), "params": s.get("params"), "iterations": s.get("iterations"),
        "iterations_planned": int(trainer.get("epochs", 0)) * int(task.get("batches", 0)),
        "final_train_loss": s.get("train_loss"), "nfe_eval": s.get("nfe_eval"),
        "wall_time_s": s.get("wall_time_s"), "valid": s.get("valid"),
        "validity_roundtrip_error": s.get("validity_roundtrip_error"),
        "validity_reference_error": s.get("validity_reference_error"),
        "grad_rel_error_init": s.get("grad_rel_error_init"),
        "grad_rel_error_final": s.get("grad_rel_error_final"),
        "batch_size": trainer.get("batch_size"), "batch_time": task.get("batch_time"),
        "optimizer": optim.get("name"), "lr": (optim.get("optimizer") or {}).get("lr"),
        "loss": task.get("loss"), "solver": s.get("solver_desc"), "gradient": s.get("gradient"),
        "max_num_steps": solver.get("max_num_steps"), "points": len(system.t),
        "keep": data.get("keep") if data.get("sampling") == "irregular" else 1.0,
        "train_fraction": data.get("train_fraction"), "device": s.get("device"),
        "threads": s.get("threads"), "load_start": s.get("load_start"),
        "load_end": s.get("load_end"), "system_text": system.description,
        "truth": system.method, "y0": system.y0.tolist(), "t_start": float(system.t[0]),
        "t_end": float(system.t[-1]), "t_split": float(system.t[train_end - 1]),
        "dir": str(path.parent), "run": str(path.parent.relative_to(root)),
    }
    for key in ("fit_mse", "fit_var", "fit_rel", "extrap_mse", "extrap_var", "extrap_rel"):
        row[key] = s.get(key) if s.get("status") == "ok" else None
    metrics = path.parent / "metrics.csv"
    m = pd.read_csv(metrics) if metrics.exists() and metrics.stat().st_size else pd.DataFrame()
    for key in ("nfe_forward", "nfe_backward"):  # mean over training; the last epoch's
        values = m[key].dropna() if key in m else pd.Series(dtype=float)
        row[key] = float(values.mean()) if len(values) else None
        row[f"{key}_last"] = float(values.iloc[-1]) if len(values) else None
    return row


def load_runs(runs: Path) -> pd.DataFrame:
    """One row per dynamics run record under ``runs`` (searched recursively). Raises
    FileNotFoundError when there is none."""
    runs = Path(runs)
    rows = [r for p in sorted(runs.rglob("summary.json")) if (r := _run_row(p, runs))]
    if not rows:
        raise FileNotFoundError(f"no dynamics run records (summary.json) under {runs}/")
    frame = pd.DataFrame(rows)
    for col in ("fit_mse", "extrap_mse", "fit_rel", "extrap_rel", "nfe_forward", "nfe_backward",
                "nfe_eval", "fit_var", "extrap_var", "validity_roundtrip_error",
                "grad_rel_error_init", "grad_rel_error_final"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _pm(values) -> str:
    return mean_std(values, ".3g", std_fmt=".2g", empty="n/a")


def _order(values, order: list[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def _groups(frame: pd.DataFrame):
    """(system, network, sampling, rows) in the report's order."""
    for system in _order(frame["system"], SYSTEM_ORDER):
        for network in _order(frame["network"], NETWORK_ORDER):
            for sampling in _order(frame["sampling"], list(SAMPLINGS)):
                g = frame[(frame["system"] == system) & (frame["network"] == network)
                          & (frame["sampling"] == sampling)]
                if len(g):
                    yield system, network, sampling, g


def _fails(g, column: str, threshold: float):
    """Per run: failed status, a missing value or ``column`` above ``threshold``."""
    values = g[column]
    return (g["status"] != "ok") | values.isna() | (values > threshold)


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per system, network and sampling: mean and std over seeds (ok runs only)."""
    rows = []
    for system, network, sampling, g in _groups(frame):
        ok = g[g["status"] == "ok"]
        row = {"system": system, "network": network, "sampling": sampling,
               "params": int(g["params"].iloc[0]), "runs": len(g), "ok": len(ok),
               "failed": int((g["status"] != "ok").sum()),
               "fails_fit": int(_fails(g, "fit_rel", FAIL_REL).sum()),
               "fails_extrap": int(_fails(g, "extrap_rel", FAIL_REL).sum()),
               "solves_valid": int(ok["valid"].fillna(False).astype(bool).sum())}
        for col in ("fit_mse", "fit_rel", "extrap_mse", "extrap_rel", "nfe_forward",
                    "nfe_backward", "nfe_eval", "wall_time_s"):
            row[f"{col}_mean"] = float(ok[col].mean()) if len(ok) else float("nan")
            row[f"{col}_std"] = float(ok[col].std()) if len(ok) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _budget(frame: pd.DataFrame, results: Path) -> str:
    """The training budget, from the run records (the same for every run of a sweep)."""
    first = frame.iloc[0]
    seeds = sorted({int(x) for x in frame["seed"]})
    iterations = ", ".join(str(i) for i in sorted({int(x) for x in frame["iterations_planned"]}))
    irregular = frame[frame["sampling"] == "irregular"]
    keep = (f"; irregular sampling keeps {float(irregular['keep'].iloc[0]):.0%} of the points"
            if len(irregular) else "")
    text = (f"{iterations} iterations per run, {first['batch_size']} sub-trajectories of "
            f"{first['batch_time']} observed points per iteration, {first['optimizer']} lr "
            f"{first['lr']:g}, {first['loss']} loss, {first['solver']} ({first['gradient']} "
            f"gradients, max_num_steps {first['max_num_steps']}); seeds "
            f"{', '.join(map(str, seeds))}; {first['points']} grid points per system{keep}; "
            f"training on the first {first['train_fraction']:.0%} of the time range; "
            f"{first['device']}, {first['threads']} thread(s) per run, two runs at a time; "
            f"{len(frame)} runs, {float(frame['wall_time_s'].sum()):.0f} s of run wall time in "
            f"all; 1-min load at the runs' start/end at most {max_load(frame):.2f}")
    quiet = quiet_verdict(results)
    return text + (f". Machine: `{quiet}`" if quiet else "")


def _tables(frame: pd.DataFrame, agg: pd.DataFrame) -> str:
    md = []
    for system in _order(agg["system"], SYSTEM_ORDER):
        rows = frame[frame["system"] == system]
        s = rows.iloc[0]
        known = rows[rows["fit_var"].notna()]  # a failed run has no errors
        v = known.iloc[0] if len(known) else s
        md.append(f"\n### {system}: {s['system_text']}\n")
        md.append(f"y0 = ({s['y0'][0]:g}, {s['y0'][1]:g}), t in [{s['t_start']:g}, "
                  f"{s['t_end']:g}], fit window up to t = {s['t_split']:.4g}; truth: "
                  f"{s['truth']}; true-trajectory variance: fit window "
                  f"{_fmt(v.get('fit_var'))}, extrapolation window {_fmt(v.get('extrap_var'))}.\n")
        head = ["network", "params", "sampling", "runs ok / failed", "fit MSE", "fit MSE / var",
                "extrap MSE", "extrap MSE / var", f"runs with fit MSE / var > {FAIL_REL:g}",
                "NFE fwd / bwd per iter", "NFE full solve", "solves valid", "round-trip error",
                "grad. error init / end", "wall s per run"]
        md.append("| " + " | ".join(head) + " |")
        md.append("|" + " --- |" * len(head))
        for _, r in agg[agg["system"] == system].iterrows():
            g = frame[(frame["system"] == system) & (frame["network"] == r["network"])
                      & (frame["sampling"] == r["sampling"])]
            ok = g[g["status"] == "ok"]
            reasons = sorted({str(e) for e in g.loc[g["status"] != "ok", "error"]})
            failed = f"{r['failed']}" + (f" ({'; '.join(reasons)})" if reasons else "")
            md.append(
                f"| {r['network']} ({g['network_text'].iloc[0]}) | {r['params']} | "
                f"{r['sampling']} | {r['ok']} / {failed} | {_pm(ok['fit_mse'])} | "
                f"{_pm(ok['fit_rel'])} | {_pm(ok['extrap_mse'])} | {_pm(ok['extrap_rel'])} | "
                f"{r['fails_fit']} of {r['runs']} | {_pm(ok['nfe_forward'])} / "
                f"{_pm(ok['nfe_backward'])} | {_pm(ok['nfe_eval'])} | "
                f"{r['solves_valid']}/{r['ok']} | {_pm(ok['validity_roundtrip_error'])} | "
                f"{_grad_cell(g, ok)} | {_pm(g['wall_time_s'])} |")
    return "\n".join(md) + "\n"


def _grad_cell(g: pd.DataFrame, ok: pd.DataFrame) -> str:
    """'init / end' relative gradient error (mean ± std; issue 13): the run's parameter gradient
    against float64 dopri5 1e-9 direct backprop on the task's fixed check batch; '-' where the
    runs did not measure it (``trainer.instruments.gradient_error`` off)."""
    if g["grad_rel_error_init"].isna().all():
        return "-"
    return f"{_pm(g['grad_rel_error_init'])} / {_pm(ok['grad_rel_error_final'])}"


CLAIMS = [  # (system, network, what the seed says, the seed's verdict: "fit", "fail", "horrible")
    ("spiral", "small", "the 2-50-2 ODE-Net fits the spiral", "fit"),
    ("random_matrix", "small", "the 2-50-2 ODE-Net fits the random linear system", "fit"),
    ("lotka_volterra", "small", "the 2-50-2 ODE-Net fits the (linear) Lotka-Volterra system",
     "fit"),
    ("nonlinear", "small", "the 2-50-2 ODE-Net \"can't learn this process well enough\"", "fail"),
    ("nn_field", "small", "the 2-50-2 ODE-Net \"fails horribly\" on the neural-network field",
     "horrible"),
    ("nn_field", "deep", "the deeper 2-150-50-50-2 ODE-Net \"works more or less\" on it", "fit"),
]


def verdicts(frame: pd.DataFrame) -> list[str]:
    """One sentence per claim of the seed and sampling, computed from the runs.

    A run *fails* when it failed numerically or its fit MSE / var exceeds FAIL_REL, and *fails
    horribly* above HORRIBLE_REL. A claim reproduces when the majority of its runs agree with
    it; a "fails horribly" claim whose runs fail, but not horribly, partly reproduces.
    """
    lines = []
    for system, network, text, expect in CLAIMS:
        for sampling in _order(frame["sampling"], list(SAMPLINGS)):
            g = frame[(frame["system"] == system) & (frame["network"] == network)
                      & (frame["sampling"] == sampling)]
            if g.empty:
                continue
            n = len(g)
            fails = int(_fails(g, "fit_rel", FAIL_REL).sum())
            horrible = int(_fails(g, "fit_rel", HORRIBLE_REL).sum())
            agree = {"fit": n - fails, "fail": fails, "horrible": horrible}[expect]
            if 2 * agree > n:
                verdict = "reproduces"
            elif expect == "horrible" and 2 * fails > n:
                verdict = "partly reproduces (the net fails, but not horribly)"
            elif 2 * agree == n:
                verdict = "is undecided (half of the runs agree)"
            else:
                verdict = "does NOT reproduce"
            ok = g[g["status"] == "ok"]
            numerical = n - len(ok)
            rel = _pm(ok["fit_rel"]) if len(ok) else "n/a"
            ext = _pm(ok["extrap_rel"]) if len(ok) else "n/a"
            lines.append(
                f"- {system}, {sampling} sampling: the seed's claim that {text} **{verdict}**: "
                f"fit MSE / var > {FAIL_REL:g} (fails) in {fails} of {n} runs, > "
                f"{HORRIBLE_REL:g} (fails horribly) in {horrible} of {n}"
                f"{f' ({numerical} numerical failure(s) among them)' if numerical else ''}; "
                f"measured fit MSE / var {rel}, extrapolation MSE / var {ext}.")
    return lines


def _figures(results: Path, frame: pd.DataFrame) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    combos = [(n, s) for n in _order(frame["network"], NETWORK_ORDER)
              for s in _order(frame["sampling"], list(SAMPLINGS))]
    for system in _order(frame["system"], SYSTEM_ORDER):
        fig, axes = plt.subplots(2, len(combos), figsize=(3.4 * len(combos), 6.2), squeeze=False)
        for col, (network, sampling) in enumerate(combos):
            g = frame[(frame["system"] == system) & (frame["network"] == network)
                      & (frame["sampling"] == sampling)].sort_values("seed")
            ax_p, ax_t = axes[0, col], axes[1, col]
            ok = g[g["status"] == "ok"]
            row = ok.iloc[0] if len(ok) else (g.iloc[0] if len(g) else None)
            traj = None if row is None else Path(row["dir"]) / "trajectory.pt"
            if traj is None or not traj.exists():
                ax_p.set_axis_off()
                ax_t.set_axis_off()
                continue
            data = torch.load(traj, weights_only=True)
            t, true, pred = data["t"].numpy(), data["true"].numpy(), data["pred"]
            cut, obs = data["train_end"], data["observed"].numpy()
            obs_train = obs[obs < cut]
            ax_p.plot(true[:, 0], true[:, 1], "g-", lw=1.0, label="true")
            ax_t.plot(t, true[:, 0], "g-", lw=1.0, label="true y1")
            ax_t.plot(t, true[:, 1], "-", color="tab:olive", lw=1.0, label="true y2")
            if sampling == "irregular":
                ax_p.plot(true[obs_train, 0], true[obs_train, 1], ".", color="grey", ms=1.5,
                          label="observed (fit window)")
            if pred is not None and row["status"] == "ok":
                pred = pred.numpy()
                ax_p.plot(pred[:cut, 0], pred[:cut, 1], "b--", lw=1.0, label="learned (fit)")
                ax_p.plot(pred[cut - 1:, 0], pred[cut - 1:, 1], "r:", lw=1.2,
                          label="learned (extrap.)")
                ax_t.plot(t, pred[:, 0], "b--", lw=1.0, label="learned y1")
                ax_t.plot(t, pred[:, 1], "--", color="tab:purple", lw=1.0, label="learned y2")
                title = (f"{network}, {sampling}, seed {int(row['seed'])}\nfit MSE/var "
                         f"{_fmt(row['fit_rel'])}, extrap {_fmt(row['extrap_rel'])}")
            else:
                title = f"{network}, {sampling}, seed {int(row['seed'])}\nfailed: {row['error']}"
            ax_t.axvline(t[cut - 1], color="k", lw=0.6, ls=":")
            ax_p.set_title(title, fontsize=8)
            ax_p.set_xlabel("y1", fontsize=8)
            ax_p.set_ylabel("y2", fontsize=8)
            ax_t.set_xlabel("t (dotted line: end of fit window)", fontsize=8)
            ax_t.set_ylabel("y", fontsize=8)
            for ax in (ax_p, ax_t):
                ax.tick_params(labelsize=7)
            if col == 0:
                ax_p.legend(fontsize=6)
                ax_t.legend(fontsize=6)
        fig.suptitle(f"{system}: true (solid) vs learned (dashed / dotted after the fit window); "
                     "phase portrait (top), time series (bottom)", fontsize=9)
        fig.tight_layout()
        name = f"{system}.png"
        fig.savefig(results / name, dpi=110)
        plt.close(fig)
        made.append(name)
    systems = _order(frame["system"], SYSTEM_ORDER)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(1, len(combos))
    for ax, col in zip(axes, ("fit_rel", "extrap_rel")):
        for k, (network, sampling) in enumerate(combos):
            for i, system in enumerate(systems):
                g = frame[(frame["system"] == system) & (frame["network"] == network)
                          & (frame["sampling"] == sampling) & (frame["status"] == "ok")]
                xs = [i - 0.4 + width * (k + 0.5)] * len(g)
                ax.scatter(xs, g[col].clip(lower=1e-8), s=12, color=f"C{k}",
                           marker="o" if sampling == "regular" else "^",
                           label=f"{network}, {sampling}" if i == 0 else None)
        ax.axhline(FAIL_REL, color="k", lw=0.7, ls="--")
        ax.axhline(HORRIBLE_REL, color="r", lw=0.7, ls=":")
        ax.set_yscale("log")
        ax.set_xticks(range(len(systems)))
        ax.set_xticklabels(systems, fontsize=8)
        ax.set_ylabel("MSE / variance of the truth")
        ax.set_title("fit window" if col == "fit_rel" else "extrapolation window", fontsize=9)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(f"per run (ok runs); dashed: 'fails' threshold {FAIL_REL:g}, dotted: 'fails "
                 f"horribly' {HORRIBLE_REL:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(results / "errors.png", dpi=110)
    plt.close(fig)
    made.append("errors.png")
    return made


def report(runs: Path, results: Path, profile: str = "cpu") -> None:
    """Write dynamics.md/.csv, runs.csv, one PNG per system, errors.png and README.md from the
    run records under ``runs`` into ``results``. Raises FileNotFoundError without a run."""
    runs, results = Path(runs), Path(results)
    frame = load_runs(runs)
    results.mkdir(parents=True, exist_ok=True)
    cols = ["run", "system", "network", "sampling", "seed", "status", "error", "params",
            "iterations", "fit_mse", "fit_var", "fit_rel", "extrap_mse", "extrap_var",
            "extrap_rel", "final_train_loss", "nfe_forward", "nfe_backward", "nfe_forward_last",
            "nfe_backward_last", "nfe_eval", "valid", "validity_roundtrip_error",
            "validity_reference_error", "grad_rel_error_init", "grad_rel_error_final",
            "wall_time_s"]
    frame[cols].to_csv(results / "runs.csv", index=False)
    agg = aggregate(frame)
    agg.to_csv(results / "dynamics.csv", index=False)
    budget = _budget(frame, results)
    header = (f"## Learning dynamical systems (seed 001): ODE-Net fit and extrapolation\n\n"
              f"Profile `{profile}`. Budget: {budget}. MSE is over both components and all grid "
              f"points of the window, from one solve of the learned field from y0 over the "
              f"whole time range; `MSE / var` divides it by the variance of the true trajectory "
              f"in the same window (averaged over the two components). NFE per iteration: mean "
              f"over training. Solve checks after the last epoch (the learned field's solve "
              f"over the fit window: reference and round-trip errors under 1 %). Mean ± std "
              f"over the ok runs.\n")
    tables = _tables(frame, agg)
    (results / "dynamics.md").write_text(header + tables)
    figures = _figures(results, frame)
    readme = [
        "# Learning dynamical systems with an ODE-Net (seed 001), measured",
        "",
        ("Made by `make reproduce-dynamics` (`nodebench reproduce seed001_dynamics "
         "profile=<cpu|paper|tiny>`); every number below comes from the runs' `summary.json`, "
         "`metrics.csv` and `trajectory.pt`, read by `nodebench/experiments/dynamics_report.py`."),
        "",
        (f"Criterion: a run *fails* to learn a system when the MSE of its learned trajectory "
         f"in the fit window exceeds {FAIL_REL:g} x the variance of the true trajectory there "
         f"(an RMS error above {math.sqrt(FAIL_REL):.0%} of the trajectory's spread), and "
         f"*fails horribly* above {HORRIBLE_REL:g} x (no better than predicting the constant "
         "mean); a run that failed numerically counts as a failure. A claim reproduces when "
         "the majority of its runs agree with it."),
        "",
        "## The seed's claims vs what was measured",
        "",
        (f"At this budget ({', '.join(str(i) for i in sorted(set(frame['iterations_planned'])))}"
         f" iterations per run, {frame['seed'].nunique()} seed(s); the seed trained for 5000 "
         "iterations, torchdiffeq's ode_demo for 2000):"),
        "",
        *verdicts(frame),
        "",
        header.replace("## ", "## Tables: ", 1),
        tables,
        "## Figures",
        "",
        ("Each system: phase portrait (top) and time series (bottom), true vs learned, for the "
         "small and deep nets on regular and irregular samples (the lowest seed that finished)."),
        "",
        *[f"![{f}]({f})" for f in figures],
        "",
        "Files: `dynamics.{md,csv}` (aggregates), `runs.csv` (one row per run).",
    ]
    (results / "README.md").write_text("\n".join(readme) + "\n")
