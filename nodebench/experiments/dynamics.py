"""`make reproduce-dynamics`: learning dynamical systems with an ODE-Net (seed 001;
docs/reference.md section 3, item 001).

An ODE-Net dy/dt = f(y), f a tanh MLP (``small`` 2-50-2, the seed's, or ``deep``
2-150-50-50-2), is fitted to one trajectory of each ground-truth system of
:mod:`nodebench.dynamics` (spiral, random_matrix, lotka_volterra, nonlinear, nn_field), sampled
on the full grid (``regular``) or on a seeded random half of it (``irregular``). Training as in
torchdiffeq's ode_demo and the seed: minibatches of short sub-trajectories (``batch_time``
consecutive observed points from ``batch_size`` random starts), L1 loss, RMSprop 1e-3, dopri5 with
direct backprop. Only the first ``train_fraction`` of the time range is used for training; after
training the learned field is solved from y0 over the whole range, and the MSE against the truth
is measured in the training window (fit) and after it (extrapolation).

Stages (``--stages``, all by default, in this order):
  train   systems x networks x samplings x seeds; one folder per run under <runs>/ with
          summary.json, history.csv (per iteration: loss, NFE forward/backward, seconds; every
          ``eval_every`` iterations the full-range fit and extrapolation errors) and
          trajectory.pt (time grid, true and learned trajectory, observed points)
  report  tables (Markdown, CSV), figures (PNG) and README.md into the results folder, built only
          from the run folders

Profiles: ``cpu`` (default; about 12 minutes on one CPU thread), ``paper`` (2000 iterations,
5 seeds), ``tiny`` (seconds: CI). A solver failure (step limit, dt underflow, non-finite loss)
ends that run with ``status: failed`` and the reason; the sweep goes on.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from ..tables import mean_std
from . import folders, measured_step, split_list

SAMPLINGS = ("regular", "irregular")

COMMON = {"batch_time": 10, "batch_size": 20, "lr": 1e-3, "optimizer": "rmsprop", "loss": "l1",
          "solver": {"method": "dopri5", "rtol": 1e-5, "atol": 1e-6, "max_num_steps": 2000},
          "gradient": "direct", "eval_max_num_steps": 20000, "keep": 0.5,
          "train_fraction": 0.75, "points": None, "system_seed": 0}

PROFILES: dict[str, dict] = {
    "cpu": {
        "description": "CPU budget: 500 iterations per run (the seed: 5000, ode_demo: 2000), "
                       "2 seeds, 1000 grid points per system, one thread (about 12 min)",
        **COMMON, "iterations": 500, "seeds": [0, 1], "eval_every": 250,
    },
    "paper": {
        "description": "paper budget: 2000 iterations per run (ode_demo's), 5 seeds, 1000 grid "
                       "points per system",
        **COMMON, "iterations": 2000, "seeds": [0, 1, 2, 3, 4], "eval_every": 250,
    },
    "tiny": {
        "description": "CI smoke budget: 4 iterations, 1 seed, 60 grid points, loose solver",
        **COMMON, "iterations": 4, "seeds": [0], "points": 60, "eval_every": 2,
        "solver": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-4, "max_num_steps": 500},
        "eval_max_num_steps": 2000, "batch_size": 8, "batch_time": 5,
    },
}

# A run "fails" to learn a system when the mean squared error of its full-range solve exceeds
# FAIL_REL x the variance of the true trajectory in the same window (variance averaged over the
# two components), and "fails horribly" above HORRIBLE_REL (no better than the constant mean).
FAIL_REL = 0.1
HORRIBLE_REL = 1.0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (``error: ...``) and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def run_name(system: str, network: str, sampling: str, seed: int) -> str:
    return f"{system}_{network}_{sampling}_s{seed}"


# ------------------------------------------------------------------------------------ training


def _batch(obs: torch.Tensor, y: torch.Tensor, batch_time: int, batch_size: int,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random sub-trajectories of ``batch_time`` consecutive observed points.

    Returns the start states (B, 2), the union of the grid offsets from each start (U,) (sorted,
    0 first), the position of every point in that union (B, T) and the targets (B, T, 2).
    """
    starts = len(obs) - batch_time + 1
    pick = torch.randperm(starts, generator=gen)[:batch_size]
    idx = obs[pick[:, None] + torch.arange(batch_time)]  # (B, T) grid indices
    offsets = idx - idx[:, :1]
    union = torch.unique(offsets)  # sorted; 0 first
    pos = torch.searchsorted(union, offsets)
    return y[idx[:, 0]], union, pos, y[idx]


def fit_system(system, network: str, sampling: str, seed: int, profile: dict,
               run_dir: Path) -> dict:
    """Train one ODE-Net on one system; write summary.json, history.csv and trajectory.pt into
    ``run_dir``; return the summary. A numerical failure ends the run with ``status: failed``."""
    from ..dynamics import NETWORK_TEXT, make_network, n_params, trajectory_errors
    from ..errors import SolverFailure, classify_solver_error
    from ..instruments import NFECounter
    from ..solvers import Gradient, Solver, odesolve

    torch.manual_seed(seed)
    func = make_network(network)
    solver = Solver(**profile["solver"])
    eval_solver = Solver(**{**profile["solver"], "max_num_steps": profile["eval_max_num_steps"]})
    gradient = Gradient(profile["gradient"])
    t, y = system.t.float(), system.y.float()
    dt = system.dt
    train_end = system.train_end(profile["train_fraction"])
    observed = system.observed(sampling, profile["keep"], seed)
    obs_train = observed[observed < train_end]
    batch_time = min(profile["batch_time"], len(obs_train))
    if profile["optimizer"] == "rmsprop":
        optimizer = torch.optim.RMSprop(func.parameters(), lr=profile["lr"])
    else:
        optimizer = torch.optim.Adam(func.parameters(), lr=profile["lr"])
    loss_fn = torch.nn.L1Loss() if profile["loss"] == "l1" else torch.nn.MSELoss()
    nfe = NFECounter(func)
    gen = torch.Generator().manual_seed(seed)
    summary = {
        "system": system.name, "network": network, "network_text": NETWORK_TEXT[network],
        "sampling": sampling, "seed": seed, "system_seed": system.seed,
        "system_text": system.description, "truth": system.method,
        "params": n_params(func), "iterations_planned": profile["iterations"],
        "batch_time": batch_time, "batch_size": profile["batch_size"], "lr": profile["lr"],
        "optimizer": profile["optimizer"], "loss": profile["loss"], "solver": solver.describe(),
        "max_num_steps": profile["solver"].get("max_num_steps"),
        "eval_max_num_steps": profile["eval_max_num_steps"], "gradient": gradient.describe(),
        "keep": profile["keep"] if sampling == "irregular" else 1.0,
        "train_fraction": profile["train_fraction"], "points": len(t),
        "observed_points": len(observed), "observed_train_points": len(obs_train),
        "train_end": train_end, "t_start": float(system.t[0]), "t_split": float(t[train_end - 1]),
        "t_end": float(system.t[-1]), "y0": system.y0.tolist(), "device": "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "status": "running", "error": None,
    }
    history: list[dict] = []
    pred = None
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        def compute_loss(y0b, union, pos, target):
            out = odesolve(func, y0b, union.float() * dt, solver, gradient)  # (U, B, 2)
            out = out[pos, torch.arange(pos.shape[0])[:, None]]  # (B, T, 2)
            return loss_fn(out, target)

        for it in range(1, profile["iterations"] + 1):
            tic = time.perf_counter()
            y0b, union, pos, target = _batch(obs_train, y, batch_time, profile["batch_size"], gen)
            value, nf, nb = measured_step(compute_loss, optimizer, nfe, f"iteration {it}",
                                          y0b, union, pos, target)
            history.append({"iteration": it, "loss": value,
                            "nfe_forward": nf,
                            "nfe_backward": nb,
                            "seconds": time.perf_counter() - tic})
            every = profile.get("eval_every") or 0
            if every and it % every == 0 and it < profile["iterations"]:
                # learning curve: the full-range solve now (not counted in the NFE columns)
                try:
                    with torch.no_grad(), nfe.phase_("curve"):
                        now = odesolve(func, y[:1], t - t[0], eval_solver, Gradient("direct"))
                    history[-1].update(trajectory_errors(system.y, now[:, 0, :].double(), train_end))
                except AssertionError as exc:  # a failed curve point is left blank
                    if classify_solver_error(exc) is None:
                        raise
                nfe.take("curve")
        summary["train_time_s"] = time.perf_counter() - started
        with torch.no_grad(), nfe.phase_("eval"):
            pred = odesolve(func, y[:1], t - t[0], eval_solver, Gradient("direct"))[:, 0, :]
        summary["nfe_eval"] = nfe.take("eval")
        if not bool(torch.isfinite(pred).all()):
            raise SolverFailure("non-finite learned trajectory")
        summary["status"] = "ok"
    except Exception as exc:
        reason = classify_solver_error(exc)
        if reason is None:
            raise
        in_training = len(history) < profile["iterations"]
        summary.update(status="failed", error=reason, failed_at_iteration=len(history) + 1,
                       failed_in="training" if in_training else "final full-range solve")
        pred = None
    nfe.remove()
    summary["wall_time_s"] = time.perf_counter() - started
    summary["cpu_time_s"] = time.process_time() - cpu_started
    summary["iterations"] = len(history)
    if history:
        tail = history[-max(1, len(history) // 10):]  # the last 10 % of the iterations
        summary["final_train_loss"] = sum(h["loss"] for h in tail) / len(tail)
        for key in ("nfe_forward", "nfe_backward"):
            summary[key] = sum(h[key] for h in history) / len(history)
            summary[f"{key}_last"] = sum(h[key] for h in tail) / len(tail)
    if pred is not None:
        summary.update(trajectory_errors(system.y, pred.double(), train_end))
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "history.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    torch.save({"t": system.t.float(), "true": system.y.float(),
                "pred": pred.float() if pred is not None else None,
                "observed": observed, "train_end": train_end}, run_dir / "trajectory.pt")
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(run_dir / "summary.json")
    return summary


HISTORY_FIELDS = ["iteration", "loss", "nfe_forward", "nfe_backward", "seconds", "fit_mse",
                  "fit_rel", "extrap_mse", "extrap_rel"]


def stage_train(profile: dict, runs: Path, systems: list[str], networks: list[str],
                samplings: list[str], seeds: list[int]) -> None:
    """Every system x network x sampling x seed; a fresh folder per run."""
    from ..dynamics import make_system

    torch.set_num_threads(1)
    runs.mkdir(parents=True, exist_ok=True)
    total = len(systems) * len(networks) * len(samplings) * len(seeds)
    done = 0
    for name in systems:
        system = make_system(name, points=profile["points"], seed=profile["system_seed"])
        for network in networks:
            for sampling in samplings:
                for seed in seeds:
                    run_dir = runs / run_name(name, network, sampling, seed)
                    if run_dir.exists():
                        shutil.rmtree(run_dir)
                    s = fit_system(system, network, sampling, seed, profile, run_dir)
                    done += 1
                    if s["status"] == "ok":
                        what = (f"fit MSE {s['fit_mse']:.3g} (rel {_fmt(s['fit_rel'])}) "
                                f"extrap MSE {_fmt(s['extrap_mse'])} (rel "
                                f"{_fmt(s['extrap_rel'])}) NFE {s['nfe_forward']:.0f}/"
                                f"{s['nfe_backward']:.0f} eval {s['nfe_eval']}")
                    else:
                        what = (f"failed ({s['failed_in']}, iteration "
                                f"{s['failed_at_iteration']}): {s['error']}")
                    print(f"[dynamics] {done}/{total} {name} {network} {sampling} s{seed}: "
                          f"{s['status']} {what} ({s['wall_time_s']:.1f} s, CPU "
                          f"{s['cpu_time_s']:.1f} s)", flush=True)


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


# -------------------------------------------------------------------------------------- report

SYSTEM_ORDER = ["spiral", "random_matrix", "lotka_volterra", "nonlinear", "nn_field"]
NETWORK_ORDER = ["small", "deep"]


def load_runs(runs: Path):
    """One row per run folder (its summary.json)."""
    import pandas as pd

    rows = [json.loads(p.read_text()) for p in sorted(runs.glob("*/summary.json"))]
    if not rows:
        raise FileNotFoundError(f"no run folders with summary.json under {runs}/")
    frame = pd.DataFrame(rows)
    for col in ("fit_mse", "extrap_mse", "fit_rel", "extrap_rel", "nfe_forward", "nfe_backward",
                "nfe_eval", "fit_var", "extrap_var"):
        if col not in frame:
            frame[col] = float("nan")
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def _pm(values) -> str:
    return mean_std(values, ".3g", std_fmt=".2g", empty="n/a")


def _order(values, order: list[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def aggregate(frame):
    """One row per system, network and sampling: mean and std over seeds (ok runs only)."""
    import pandas as pd

    rows = []
    for system in _order(frame["system"], SYSTEM_ORDER):
        for network in _order(frame["network"], NETWORK_ORDER):
            for sampling in _order(frame["sampling"], list(SAMPLINGS)):
                g = frame[(frame["system"] == system) & (frame["network"] == network)
                          & (frame["sampling"] == sampling)]
                if g.empty:
                    continue
                ok = g[g["status"] == "ok"]
                row = {"system": system, "network": network, "sampling": sampling,
                       "params": int(g["params"].iloc[0]), "runs": len(g), "ok": len(ok),
                       "failed": int((g["status"] != "ok").sum()),
                       "fails_fit": int(_fails(g, "fit_rel", FAIL_REL).sum()),
                       "fails_extrap": int(_fails(g, "extrap_rel", FAIL_REL).sum())}
                for col in ("fit_mse", "fit_rel", "extrap_mse", "extrap_rel", "nfe_forward",
                            "nfe_backward", "nfe_eval", "wall_time_s"):
                    row[f"{col}_mean"] = float(ok[col].mean()) if len(ok) else float("nan")
                    row[f"{col}_std"] = float(ok[col].std()) if len(ok) > 1 else float("nan")
                rows.append(row)
    return pd.DataFrame(rows)


def _fails(g, column: str, threshold: float):
    """Per run: failed status, a missing value or ``column`` above ``threshold``."""
    values = g[column]
    return (g["status"] != "ok") | values.isna() | (values > threshold)


def _iterations(frame) -> str:
    return ", ".join(str(i) for i in sorted({int(x) for x in frame["iterations_planned"]}))


def _budget(frame) -> str:
    """The training budget, from the run summaries (the same for every run of a sweep)."""
    first = frame.iloc[0]
    seeds = sorted({int(x) for x in frame["seed"]})
    threads = sorted({int(x) for x in frame["threads"]})
    devices = sorted({str(x) for x in frame["device"]})
    irregular = frame[frame["sampling"] == "irregular"]
    keep = (f"; irregular sampling keeps {float(irregular['keep'].iloc[0]):.0%} of the points"
            if len(irregular) else "")
    total, cpu = float(frame["wall_time_s"].sum()), float(frame["cpu_time_s"].sum())
    return (f"{_iterations(frame)} iterations per run, {first['batch_size']} "
            f"sub-trajectories of {first['batch_time']} observed points per iteration, "
            f"{first['optimizer']} lr {first['lr']:g}, {first['loss']} loss, {first['solver']} "
            f"({first['gradient']} gradients, max_num_steps {first['max_num_steps']}); "
            f"seeds {', '.join(map(str, seeds))}; {first['points']} grid points per system"
            f"{keep}; training on the first {first['train_fraction']:.0%} of the time range; "
            f"device {', '.join(devices)}, {', '.join(map(str, threads))} thread(s), "
            f"torch {first['torch']}; wall time {total:.0f} s (CPU time {cpu:.0f} s) summed "
            f"over {len(frame)} runs")


def _tables(frame, agg) -> str:
    md = []
    for system in _order(agg["system"], SYSTEM_ORDER):
        rows = frame[frame["system"] == system]
        known = rows[rows["fit_var"].notna()]  # a failed run has no errors
        s = known.iloc[0] if len(known) else rows.iloc[0]
        md.append(f"\n### {system}: {s['system_text']}\n")
        md.append(f"y0 = ({s['y0'][0]:g}, {s['y0'][1]:g}), t in [{s['t_start']:g}, "
                  f"{s['t_end']:g}], fit window up to t = {s['t_split']:.4g}; truth: "
                  f"{s['truth']}; true-trajectory variance: fit window "
                  f"{_fmt(s.get('fit_var'))}, extrapolation window {_fmt(s.get('extrap_var'))}.\n")
        head = ["network", "params", "sampling", "runs ok / failed", "fit MSE", "fit MSE / var",
                "extrap MSE", "extrap MSE / var", f"runs with fit MSE / var > {FAIL_REL:g}",
                "NFE fwd / bwd per iter", "NFE full solve", "wall / CPU s per run"]
        md.append("| " + " | ".join(head) + " |")
        md.append("|" + " --- |" * len(head))
        a = agg[agg["system"] == system]
        for _, r in a.iterrows():
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
                f"{_pm(g['wall_time_s'])} / {_pm(g['cpu_time_s'])} |")
    return "\n".join(md) + "\n"


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


def verdicts(frame) -> list[str]:
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


def _figures(runs: Path, results: Path, frame) -> list[str]:
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
            if g.empty:
                ax_p.set_axis_off()
                ax_t.set_axis_off()
                continue
            ok = g[g["status"] == "ok"]
            row = ok.iloc[0] if len(ok) else g.iloc[0]
            run_dir = runs / run_name(system, network, sampling, int(row["seed"]))
            data = torch.load(run_dir / "trajectory.pt")
            t, true, pred = data["t"].numpy(), data["true"].numpy(), data["pred"]
            cut, obs = data["train_end"], data["observed"].numpy()
            obs_train = obs[obs < cut]
            ax_p.plot(true[:, 0], true[:, 1], "g-", lw=1.0, label="true")
            ax_t.plot(t, true[:, 0], "g-", lw=1.0, label="true y1")
            ax_t.plot(t, true[:, 1], "-", color="tab:olive", lw=1.0, label="true y2")
            if sampling == "irregular":
                ax_p.plot(true[obs_train, 0], true[obs_train, 1], ".", color="grey", ms=1.5,
                          label="observed (fit window)")
            if pred is not None:
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
    # summary: fit and extrapolation error relative to the variance, per run
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
        ax.legend(fontsize=7)
    fig.suptitle(f"per run (ok runs); dashed: 'fails' threshold {FAIL_REL:g}, dotted: 'fails "
                 f"horribly' {HORRIBLE_REL:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(results / "errors.png", dpi=110)
    plt.close(fig)
    made.append("errors.png")
    return made


def report(runs: Path, results: Path, profile: str = "cpu", description: str = "") -> None:
    """Write dynamics.md/.csv, runs.csv, one PNG per system, errors.png and README.md."""
    results.mkdir(parents=True, exist_ok=True)
    frame = load_runs(runs)
    cols = [c for c in ("system", "network", "sampling", "seed", "status", "error", "params",
                        "iterations", "fit_mse", "fit_var", "fit_rel", "extrap_mse",
                        "extrap_var", "extrap_rel", "final_train_loss", "nfe_forward",
                        "nfe_backward", "nfe_forward_last", "nfe_backward_last", "nfe_eval",
                        "wall_time_s", "cpu_time_s") if c in frame]
    frame[cols].to_csv(results / "runs.csv", index=False)
    agg = aggregate(frame)
    agg.to_csv(results / "dynamics.csv", index=False)
    budget = _budget(frame)
    header = (f"## Learning dynamical systems (seed 001): ODE-Net fit and extrapolation\n\n"
              f"Profile `{profile}`{': ' + description if description else ''}. Budget: "
              f"{budget}. MSE is over both components and all grid points of the window, from "
              f"one solve of the learned field from y0 over the whole time range; "
              f"`MSE / var` divides it by the variance of the true trajectory in the same "
              f"window (averaged over the two components). Mean ± std over the ok runs.\n")
    tables = _tables(frame, agg)
    (results / "dynamics.md").write_text(header + tables)
    claims = verdicts(frame)
    figures = _figures(runs, results, frame)
    readme = [
        "# Learning dynamical systems with an ODE-Net (seed 001), measured",
        "",
        ("Made by `make reproduce-dynamics` (`python -m nodebench.experiments.dynamics "
         "--profile <cpu|paper|tiny>`); every number below comes from the run folders' "
         "`summary.json` and `trajectory.pt`, re-aggregated by the `report` stage."),
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
        (f"At this budget ({_iterations(frame)} iterations per run, {frame['seed'].nunique()} "
         "seed(s); the seed trained for 5000 iterations, torchdiffeq's ode_demo for 2000):"),
        "",
        *claims,
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


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from ..dynamics import NETWORKS, SYSTEMS

    p = _Parser(prog="python -m nodebench.experiments.dynamics",
                description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    p.add_argument("--stages", default="train,report")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--networks", default=",".join(NETWORKS))
    p.add_argument("--samplings", default=",".join(SAMPLINGS))
    p.add_argument("--seeds", default=None, help="e.g. 0,1 (default: the profile's)")
    p.add_argument("--iterations", type=int, default=None,
                   help="iterations per run (default: the profile's)")
    p.add_argument("--note", default="", help="a sentence for the tables' budget line")
    p.add_argument("--runs", default=None, help="run folder (default runs/dynamics-<profile>)")
    p.add_argument("--results", default=None, help="results folder (default results/dynamics "
                   "for cpu, results/dynamics-<profile> otherwise)")
    a = p.parse_args(argv)
    profile = dict(PROFILES[a.profile])
    _, runs, results = folders("dynamics", a.profile, a.runs, a.results)
    stages, systems = split_list(a.stages), split_list(a.systems)
    networks, samplings = split_list(a.networks), split_list(a.samplings)
    for what, given, valid in (("stage", stages, ("train", "report")),
                               ("system", systems, tuple(SYSTEMS)),
                               ("network", networks, tuple(NETWORKS)),
                               ("sampling", samplings, SAMPLINGS)):
        bad = [x for x in given if x not in valid]
        if bad or not given:
            print(f"{p.prog}: error: unknown {what}(s) {', '.join(bad) or '(none given)'}; "
                  f"choose from {', '.join(valid)}", file=sys.stderr)
            return 2
    if a.seeds is not None:
        try:
            profile["seeds"] = [int(x) for x in split_list(a.seeds)]
        except ValueError:
            print(f"{p.prog}: error: --seeds must be comma-separated integers, got {a.seeds!r}",
                  file=sys.stderr)
            return 2
        if not profile["seeds"]:
            print(f"{p.prog}: error: --seeds is empty", file=sys.stderr)
            return 2
    if a.iterations is not None:
        if a.iterations < 1:
            print(f"{p.prog}: error: --iterations must be positive, got {a.iterations}",
                  file=sys.stderr)
            return 2
        profile["iterations"] = a.iterations
    started = time.time()
    if "train" in stages:
        stage_train(profile, runs, systems, networks, samplings, profile["seeds"])
    if "report" in stages:
        if not any(runs.glob("*/summary.json")):
            print(f"{p.prog}: error: no runs under {runs}/ (run the train stage first)",
                  file=sys.stderr)
            return 2
        report(runs, results, profile=a.profile,
               description=profile["description"] + (f"; {a.note}" if a.note else ""))
    print(f"[dynamics] done in {time.time() - started:.0f} s; results in {results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
