"""`make reproduce-latent`: latent ODE vs RNN on noisy 2-D spirals, Table 2 of Chen et al. 2018
(predictive RMSE on the test set with n = 30, 50, 100 of 100 observations; docs/reference.md,
"Table 2"). Data and models: :mod:`nodebench.latent`.

Stages (``--stages``, all by default, in this order):
  train   one run per (model, n, seed) into ``runs/latent-<profile>/<model>_n<n>_s<seed>/``:
          summary.json (written last), metrics.csv (training curve), predictions.pt (a few test
          spirals for the figure); a solver failure ends that run with status ``failed`` and its
          reason, and the sweep goes on
  report  Table 2 (Markdown + CSV) with the paper's values in separate rows, a details table,
          figures (PNG) and README.md into the results folder, built only from the run folders

Models (``--models``): ``rnn`` (RNN, 25 units, Gaussian NLL of the next observation),
``rnn_dt`` (the same with the time gap to the predicted point as an extra input),
``latent_ode`` (recognition RNN 25 units backwards in time, latent 4, f 4-20-4, decoder 4-20-2,
ELBO).

Profiles: ``cpu`` (default; 3 models x 3 n x 2 seeds, 800 iterations each: about 16 min of
CPU time on one thread), ``paper`` (3000 iterations, 5 seeds: about 2.5 h), ``tiny`` (seconds:
CI).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from ..errors import SolverFailure, classify_solver_error
from ..instruments import NFECounter
from ..latent import (
    CELLS,
    MODELS,
    LatentODE,
    SpiralConfig,
    build_model,
    count_parameters,
    make_spirals,
    observe,
    predict,
    rmse,
)
from ..solvers import Gradient, Solver
from . import folders, measured_step, split_list

NAME = "latent"
STAGES = ("train", "report")
N_VALUES = (30, 50, 100)  # Table 2's columns (any 1..n_window is accepted)

# Chen et al. 2018, Table 2: predictive RMSE on the test set, by number of observations.
PAPER_RMSE = {"rnn": {30: 0.3937, 50: 0.3202, 100: 0.1813},
              "latent_ode": {30: 0.1642, 50: 0.1502, 100: 0.1346}}
TITLES = {"rnn": "RNN", "rnn_dt": "RNN + time gaps", "latent_ode": "Latent ODE"}

# Settings common to all profiles; each is one of the choices the paper leaves open.
COMMON: dict = {
    "cell": "gru",           # recurrent cell of the recognition net and of the baselines
    "optimizer": "adam",     # Adam (torch defaults betas 0.9/0.999), constant lr
    "lr": 0.01,              # torchdiffeq's latent_ode example
    "schedule": "constant",  # or "cosine": lr decays to 0 over the run (per iteration)
    "batch": 100,            # spirals per iteration, drawn without replacement per epoch
    "obs_std": 0.1,          # fixed observation std of the latent ODE's likelihood (= noise)
    # max_num_steps: torchdiffeq counts it between consecutive output times (grid points, 0.05
    # apart), not over the whole solve; a healthy solve takes less than one step per interval
    "solver": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-4, "max_num_steps": 100},
    "gradient": "direct",    # backprop through dopri5's steps (adjoint: 30x the backward cost)
    "keep": 4,               # test spirals saved for the figure
    "threads": 1,
}

PROFILES: dict[str, dict] = {
    "cpu": {
        **COMMON,
        "description": "CPU budget: the paper's data sizes (1000 spirals, 800 train / 200 test, "
                       "100 + 100 steps) and model sizes; 800 Adam iterations of 100 spirals per "
                       "run, 2 seeds, one CPU thread",
        "spirals": {},
        "iterations": 800, "seeds": [0, 1], "log_every": 50, "eval_every": 50,
    },
    "paper": {
        **COMMON,
        "description": "longer training: 3000 Adam iterations of 100 spirals per run, 5 seeds "
                       "(about 2.5 h on one CPU thread)",
        "spirals": {},
        "iterations": 3000, "seeds": [0, 1, 2, 3, 4], "log_every": 100, "eval_every": 100,
    },
    "tiny": {
        **COMMON,
        "description": "CI smoke budget: 40 spirals (30 train / 10 test), 100 + 100 steps, "
                       "6 iterations of 10 spirals, 1 seed",
        "spirals": {"n_spirals": 40, "n_train": 30},
        "batch": 10, "iterations": 6, "seeds": [0], "log_every": 3, "eval_every": 3,
        "keep": 2,
    },
}


class OptionError(Exception):
    """A bad command-line option: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise OptionError(message)


def run_name(model: str, n: int, seed: int) -> str:
    return f"{model}_n{n}_s{seed}"


def spiral_config(profile: dict) -> SpiralConfig:
    return SpiralConfig(**profile["spirals"])


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a reader never sees half a summary."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _make(profile: dict, model: str):
    s = profile["solver"]
    solver = Solver(s["method"], rtol=s["rtol"], atol=s["atol"],
                    max_num_steps=s.get("max_num_steps"))
    return build_model(model, solver, Gradient(profile["gradient"]), cell=profile["cell"])


def _loss(net, obs, grid: torch.Tensor, obs_std: float) -> tuple[torch.Tensor, float]:
    """Training loss and the number logged: -ELBO per spiral (latent ODE; logged: the ELBO) or
    the NLL per predicted point (RNNs)."""
    if isinstance(net, LatentODE):
        loglik, kl = net.elbo(obs.x, obs.t, obs.idx, grid, obs_std)
        elbo = (loglik - kl).mean()
        return -elbo, float(elbo.detach())
    nll = net.nll(obs.x, obs.t)
    return nll, float(nll.detach())


def _evaluate(net, spirals, obs) -> dict:
    """Test-set metrics: predictive RMSE (extrapolation window) against the noisy points and
    the noise-free curve; reconstruction RMSE at the observed points."""
    test = spirals.test
    p = predict(net, spirals, obs, test)
    return {"test_rmse": rmse(p["extrap"], spirals.noisy[test][:, spirals.extrap]),
            "test_rmse_clean": rmse(p["extrap"], spirals.clean[test][:, spirals.extrap]),
            "recon_rmse": rmse(p["recon"], p["recon_target"])}, p


def train_one(profile: dict, model: str, n: int, seed: int, run_dir: Path) -> dict:
    """Train one (model, n, seed) and write its run folder. Returns the summary."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    tag = f"{model} n={n} s{seed}"
    cfg = spiral_config(profile)
    spirals = make_spirals(cfg, seed)
    obs = observe(spirals, n, seed)
    torch.manual_seed(seed)
    net = _make(profile, model)
    opt = torch.optim.Adam(net.parameters(), lr=profile["lr"])
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, profile["iterations"])
             if profile["schedule"] == "cosine" else None)
    counter = NFECounter(net)
    order = torch.Generator().manual_seed(seed)
    grid = spirals.t[spirals.window]
    iterations, batch = profile["iterations"], profile["batch"]
    summary = {"model": model, "n": n, "seed": seed, "status": "ok", "error": None,
               "params": count_parameters(net), "iterations": 0,
               "loss_name": "elbo" if model == "latent_ode" else "nll"}
    rows: list[dict] = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    perm, pos, window, nfe_f, nfe_b = torch.randperm(cfg.n_train, generator=order), 0, [], [], []
    p = None
    try:
        for it in range(1, iterations + 1):
            if pos + batch > cfg.n_train:
                perm, pos = torch.randperm(cfg.n_train, generator=order), 0
            rows_b = perm[pos:pos + batch]
            pos += batch
            net.train()
            logged, nf, nb = measured_step(_loss, opt, counter, f"iteration {it}", net,
                                           obs[rows_b], grid, profile["obs_std"])
            if sched is not None:
                sched.step()
            summary["iterations"] = it
            window.append(logged)
            nfe_f.append(nf)
            nfe_b.append(nb)
            row = None
            if it % profile["log_every"] == 0 or it == iterations:
                row = {"iteration": it, "loss": sum(window) / len(window),
                       "nfe_forward": sum(nfe_f[-len(window):]) / len(window),
                       "nfe_backward": sum(nfe_b[-len(window):]) / len(window),
                       "wall_s": time.perf_counter() - wall0}
                window = []
            if it % profile["eval_every"] == 0 or it == iterations:
                net.eval()
                with counter.phase_("eval"):
                    metrics, p = _evaluate(net, spirals, obs)
                row = row or {"iteration": it}
                row.update(metrics, nfe_eval=counter.take("eval"))
            if row is not None:
                rows.append(row)
                print(f"[latent] {tag}: it {it}/{iterations} "
                      + (f"{summary['loss_name']} {row['loss']:.4g} " if "loss" in row else "")
                      + (f"nfe {row['nfe_forward']:.0f} " if model == "latent_ode" else "")
                      + (f"test rmse {row['test_rmse']:.4f} " if "test_rmse" in row else "")
                      + f"({time.perf_counter() - wall0:.0f} s)", flush=True)
    except (AssertionError, SolverFailure) as exc:
        reason = classify_solver_error(exc)
        if reason is None:
            raise
        summary.update(status="failed", error=reason)
        p = None
    counter.remove()
    _write_metrics(run_dir / "metrics.csv", rows)
    last = rows[-1] if rows and summary["status"] == "ok" else {}
    losses = [r["loss"] for r in rows if "loss" in r]
    summary.update({
        "test_rmse": last.get("test_rmse"), "test_rmse_clean": last.get("test_rmse_clean"),
        "recon_rmse": last.get("recon_rmse"),
        "final_loss": losses[-1] if losses else None,
        "nfe_forward": (sum(nfe_f[-10:]) / len(nfe_f[-10:])) if nfe_f else 0,
        "nfe_backward": (sum(nfe_b[-10:]) / len(nfe_b[-10:])) if nfe_b else 0,
        "nfe_eval": last.get("nfe_eval", 0),
        "wall_time_s": time.perf_counter() - wall0, "cpu_time_s": time.process_time() - cpu0,
        "threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__,
        "spirals": cfg.as_dict(),
        "config": {k: v for k, v in profile.items() if k not in ("description", "seeds")},
    })
    if p is not None:
        k = min(profile["keep"], cfg.n_spirals - cfg.n_train)
        test = torch.arange(cfg.n_train, cfg.n_train + k)
        o = obs[test]
        keep = {"t": spirals.t, "n_window": cfg.n_window, "clean": spirals.clean[test],
                "noisy": spirals.noisy[test], "obs_idx": o.idx, "obs_x": o.x,
                **{key: value[:k].detach() for key, value in p.items()}}
        torch.save(keep, run_dir / "predictions.pt")
    _write_json(run_dir / "summary.json", summary)
    if summary["status"] == "ok":
        print(f"[latent] {tag}: done, test RMSE {summary['test_rmse']:.4f} (noise-free "
              f"{summary['test_rmse_clean']:.4f}), reconstruction {summary['recon_rmse']:.4f}, "
              f"{summary['wall_time_s']:.0f} s", flush=True)
    else:
        print(f"[latent] {tag}: FAILED after {summary['iterations']} iterations: "
              f"{summary['error']}", flush=True)
    return summary


def _write_metrics(path: Path, rows: list[dict]) -> None:
    keys = ["iteration", "loss", "nfe_forward", "nfe_backward", "wall_s", "test_rmse",
            "test_rmse_clean", "recon_rmse", "nfe_eval"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})


def stage_train(profile: dict, runs: Path, models: list[str], ns: list[int],
                seeds: list[int]) -> None:
    """Every (seed, n, model), cheap models first within a (seed, n): partial sweeps are useful."""
    runs.mkdir(parents=True, exist_ok=True)
    jobs = [(m, n, s) for s in seeds for n in ns for m in MODELS if m in models]
    started = time.perf_counter()
    for i, (model, n, seed) in enumerate(jobs, start=1):
        print(f"[latent] run {i}/{len(jobs)}: {model} n={n} seed {seed}", flush=True)
        train_one(profile, model, n, seed, runs / run_name(model, n, seed))
    print(f"[latent] train: {len(jobs)} runs in {time.perf_counter() - started:.0f} s",
          flush=True)


# ---------------------------------------------------------------------------------------------
# Report (only from the run folders)
# ---------------------------------------------------------------------------------------------

def _collect(runs: Path):
    import pandas as pd

    rows = []
    for path in sorted(runs.glob("*/summary.json")):
        s = json.loads(path.read_text())
        rows.append({k: v for k, v in s.items() if k not in ("config", "spirals")}
                    | {"run": path.parent.name})
    if not rows:
        return None, None
    first = json.loads(min(runs.glob("*/summary.json")).read_text())
    frame = pd.DataFrame(rows).sort_values(["model", "n", "seed"], kind="stable")
    return frame.reset_index(drop=True), first


def _pm(values) -> str:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def _table2(frame, column: str) -> tuple[list[str], list[dict]]:
    """Markdown lines and CSV rows of Table 2's layout for ``column``."""
    ns = sorted(int(n) for n in frame["n"].unique())
    head = ["model", "source"] + [f"n = {n}" for n in ns]
    md = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    out = []
    for model in MODELS:
        sub = frame[frame["model"] == model]
        if sub.empty:
            continue
        cells = []
        for n in ns:
            r = sub[sub["n"] == n]
            ok = r[r["status"] == "ok"]
            text = _pm(ok[column].tolist())
            if len(r) > len(ok):
                text += f" ({len(r) - len(ok)} of {len(r)} failed)"
            cells.append(text)
            vals = [float(v) for v in ok[column]]
            mean = sum(vals) / len(vals) if vals else float("nan")
            std = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                   if len(vals) > 1 else float("nan"))
            out.append({"model": model, "source": "measured", "n": n, "mean": mean, "std": std,
                        "seeds_ok": len(ok), "seeds_failed": len(r) - len(ok)})
        md.append(f"| {TITLES[model]} | measured (mean ± std over seeds) | "
                  + " | ".join(cells) + " |")
    if column == "test_rmse":
        for model, values in PAPER_RMSE.items():
            label = "RNN (paper: variant not stated)" if model == "rnn" else TITLES[model]
            md.append(f"| {label} | **paper** (Chen et al. 2018, Table 2) | "
                      + " | ".join(f"{values[n]:.4f}" if n in values else "-" for n in ns)
                      + " |")
            out += [{"model": model, "source": "paper", "n": n, "mean": values[n], "std": "",
                     "seeds_ok": "", "seeds_failed": ""} for n in ns if n in values]
    return md, out


def _details(frame) -> tuple[list[str], object]:
    """Per (model, n): all the measured quantities, means over the successful seeds."""
    import pandas as pd

    head = ["model", "n", "seeds ok / run", "test RMSE (noisy)", "test RMSE (noise-free)",
            "reconstruction RMSE", "final train ELBO / NLL",
            "NFE forward / backward per iteration (last 10)", "NFE eval", "iterations", "params", "wall s per run",
            "CPU s per run"]
    md = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows = []
    for model in MODELS:
        for n in sorted(frame["n"].unique()):
            r = frame[(frame["model"] == model) & (frame["n"] == n)]
            if r.empty:
                continue
            ok = r[r["status"] == "ok"]
            mean = ok.mean(numeric_only=True) if len(ok) else r.mean(numeric_only=True) * math.nan
            errors = sorted(set(r.loc[r["status"] != "ok", "error"].astype(str)))
            nfe = (f"{mean['nfe_forward']:.0f} / {mean['nfe_backward']:.0f}"
                   if model == "latent_ode" and len(ok) else "-")
            loss = "-" if not len(ok) else f"{mean['final_loss']:.4g} " + (
                "(ELBO per spiral)" if model == "latent_ode" else "(NLL per point)")
            md.append(
                f"| {TITLES[model]} | {int(n)} | {len(ok)} / {len(r)} | "
                f"{_pm(ok['test_rmse'].tolist())} | {_pm(ok['test_rmse_clean'].tolist())} | "
                f"{_pm(ok['recon_rmse'].tolist())} | {loss} | {nfe} | "
                + (f"{mean['nfe_eval']:.0f}" if model == "latent_ode" and len(ok) else "-")
                + f" | {int(r['iterations'].max())} | {int(r['params'].iloc[0])} | "
                f"{r['wall_time_s'].mean():.0f} | {r['cpu_time_s'].mean():.0f} |"
                + (f" failed: {'; '.join(errors)}" if errors else ""))
            rows.append({"model": model, "n": int(n), "seeds_ok": len(ok), "seeds_run": len(r),
                         **{k: mean.get(k) for k in ("test_rmse", "test_rmse_clean",
                                                     "recon_rmse", "final_loss", "nfe_forward",
                                                     "nfe_backward", "nfe_eval")},
                         "iterations": int(r["iterations"].max()),
                         "params": int(r["params"].iloc[0]),
                         "wall_time_s": float(r["wall_time_s"].mean()),
                         "cpu_time_s": float(r["cpu_time_s"].mean()),
                         "errors": "; ".join(errors)})
    return md, pd.DataFrame(rows)


def _budget(frame, first: dict, profile_name: str) -> str:
    c, s = first["config"], first["spirals"]
    solver = c["solver"]
    seeds = sorted(int(x) for x in frame["seed"].unique())
    return (
        f"Budget (profile `{profile_name}`): {c['iterations']} iterations per run, "
        f"{c['optimizer']} lr {c['lr']:g} ({c['schedule']}), batch {c['batch']} spirals; data "
        f"{s['n_spirals']} spirals ({s['n_train']} train / {s['n_spirals'] - s['n_train']} "
        f"test), {s['n_window']} observation + {s['n_extrap']} extrapolation steps of "
        f"{s['dt']:g}, {s['turns']:g} turn per window, noise std {s['noise']:g}; latent ODE "
        f"likelihood std {c['obs_std']:g}, {solver['method']} rtol {solver['rtol']:g} atol "
        f"{solver['atol']:g} (at most {solver['max_num_steps']} steps between output times), "
        f"{c['gradient']} gradients; "
        f"RNN cell {c['cell']}; seeds {', '.join(map(str, seeds))}; device "
        f"{first['device']}, {first['threads']} thread(s), torch {first['torch']}; wall time "
        f"{frame['wall_time_s'].sum():.0f} s in all ({frame['cpu_time_s'].sum():.0f} s CPU).")


def _figures(runs: Path, results: Path, frame) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    made = []
    ns = sorted(int(n) for n in frame["n"].unique())
    seed = int(frame["seed"].min())
    preds = {}
    for model in MODELS:
        for n in ns:
            path = runs / run_name(model, n, seed) / "predictions.pt"
            if path.exists():
                preds[(model, n)] = torch.load(path)
    if preds:
        k = max(len(p["clean"]) for p in preds.values())
        k = min(k, 3)
        fig, axes = plt.subplots(k, len(ns), figsize=(3.6 * len(ns), 3.4 * k), squeeze=False)
        colours = {"latent_ode": "tab:red", "rnn": "tab:blue", "rnn_dt": "tab:green"}
        for col, n in enumerate(ns):
            base = next((preds[(m, n)] for m in MODELS if (m, n) in preds), None)
            for row in range(k):
                ax = axes[row, col]
                if base is None or row >= len(base["clean"]):
                    ax.axis("off")
                    continue
                w = base["n_window"]
                clean = base["clean"][row]
                ax.plot(clean[:w, 0], clean[:w, 1], color="0.55", lw=1.2, label="true (window)")
                ax.plot(clean[w:, 0], clean[w:, 1], color="0.55", lw=1.2, ls="--",
                        label="true (extrapolation)")
                ax.scatter(base["obs_x"][row, :, 0], base["obs_x"][row, :, 1], s=7,
                           color="k", zorder=3, label="observations (n per column)")
                for model in MODELS:
                    p = preds.get((model, n))
                    if p is None:
                        continue
                    if "grid" in p:
                        g = p["grid"][row]
                        ax.plot(g[:w, 0], g[:w, 1], color=colours[model], lw=1.2,
                                label=f"{TITLES[model]} (reconstruction)")
                        ax.plot(g[w - 1:, 0], g[w - 1:, 1], color=colours[model], lw=1.2,
                                ls="--", label=f"{TITLES[model]} (extrapolation)")
                    else:
                        e = p["extrap"][row]
                        ax.plot(e[:, 0], e[:, 1], color=colours[model], lw=1.0, ls="--",
                                label=f"{TITLES[model]} (extrapolation)")
                ax.set_aspect("equal", adjustable="datalim")
                ax.set_title(f"n = {n}, test spiral {row}", fontsize=9)
                ax.tick_params(labelsize=7)
        legend: dict = {}
        for ax in axes.flat:  # every label once, whichever panel has it
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        fig.legend(legend.values(), legend.keys(), loc="lower center", fontsize=8,
                   ncol=min(4, max(2, len(ns) + 1)))
        fig.suptitle(f"Test spirals (seed {seed}): truth, observations, reconstruction and "
                     "extrapolation", fontsize=10)
        fig.tight_layout(rect=(0, 0.1, 1, 0.97))
        fig.savefig(results / "spirals.png", dpi=110)
        plt.close(fig)
        made.append("spirals.png")
    curves = []
    for _, r in frame.iterrows():
        path = runs / r["run"] / "metrics.csv"
        if path.exists():
            m = pd.read_csv(path)
            m["model"], m["n"], m["seed"] = r["model"], int(r["n"]), int(r["seed"])
            curves.append(m)
    if curves:
        data = pd.concat(curves, ignore_index=True)
        models = [m for m in MODELS if m in set(data["model"])]
        fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4),
                                 squeeze=False)
        for j, model in enumerate(models):
            d = data[data["model"] == model]
            for n in ns:
                dn = d[d["n"] == n]
                for seed_, ds in dn.groupby("seed"):
                    lab = f"n = {n}" if seed_ == dn["seed"].min() else None
                    colour = f"C{ns.index(n)}"
                    tr = ds.dropna(subset=["loss"])
                    axes[0, j].plot(tr["iteration"], tr["loss"], color=colour, lw=0.9,
                                    label=lab)
                    ev = ds.dropna(subset=["test_rmse"])
                    axes[1, j].plot(ev["iteration"], ev["test_rmse"], color=colour, lw=0.9,
                                    marker="o", ms=2, label=lab)
            axes[0, j].set_title(f"{TITLES[model]}: training "
                                 + ("ELBO per spiral\n(y range: the last 3/4 of the run)" if model == "latent_ode"
                                    else "NLL per point"), fontsize=9)
            late = d.dropna(subset=["loss"])
            late = late[late["iteration"] > 0.25 * late["iteration"].max()]["loss"]
            if model == "latent_ode" and len(late):  # the first ELBOs are far below the rest
                pad = 0.05 * (late.max() - late.min()) + 1e-9
                axes[0, j].set_ylim(late.min() - pad, late.max() + pad)
            axes[1, j].set_title(f"{TITLES[model]}: test predictive RMSE", fontsize=9)
            axes[1, j].set_xlabel("iteration")
            for ax in axes[:, j]:
                ax.legend(fontsize=7)
                ax.tick_params(labelsize=7)
        fig.suptitle("Training curves (one line per seed)", fontsize=10)
        fig.tight_layout()
        fig.savefig(results / "curves.png", dpi=110)
        plt.close(fig)
        made.append("curves.png")
    return made


def report(runs: Path, results: Path, profile_name: str) -> bool:
    """Tables (Markdown + CSV), figures and README.md from the run folders in ``runs``.
    Returns False when there is no run to report."""
    import pandas as pd

    frame, first = _collect(runs)
    if frame is None:
        print(f"[latent] report: no run folders with summary.json in {runs}/", file=sys.stderr)
        return False
    results.mkdir(parents=True, exist_ok=True)
    frame.to_csv(results / "runs.csv", index=False)
    budget = _budget(frame, first, profile_name)
    t2_md, t2_rows = _table2(frame, "test_rmse")
    clean_md, clean_rows = _table2(frame, "test_rmse_clean")
    pd.DataFrame(t2_rows).to_csv(results / "table2.csv", index=False)
    pd.DataFrame(clean_rows).to_csv(results / "table2_noise_free.csv", index=False)
    s = first["spirals"]
    heading = (f"### Table 2: predictive RMSE on the test set ({s['n_extrap']} extrapolation "
               f"points), by number of observations out of {s['n_window']}")
    note = (f"RMSE: sqrt of the mean squared error over all test spirals, the {s['n_extrap']} "
            "extrapolation points and both coordinates, against the noisy test points (as the "
            "paper's test data). Measured rows: mean ± sample std over seeds; the paper's values "
            "are in the rows marked **paper** only.")
    title = f"{heading}\n\n{budget} {note}\n"
    (results / "table2.md").write_text(title + "\n" + "\n".join(t2_md) + "\n")
    det_md, det = _details(frame)
    det.to_csv(results / "details.csv", index=False)
    (results / "details.md").write_text("\n".join(det_md) + "\n")
    figures = _figures(runs, results, frame)
    failed = frame[frame["status"] != "ok"]
    readme = [
        "# Latent ODE vs RNN on spirals (Chen et al. 2018, Table 2), measured",
        "",
        ("Made by `make reproduce-latent` (`python -m nodebench.experiments.latent --profile "
         f"{profile_name}`); every number below comes from the run folders' `summary.json` and "
         "`metrics.csv`, re-aggregated by the `report` stage."),
        "",
        budget,
        "",
        heading,
        "",
        note,
        "",
        *t2_md,
        "",
        "### The same runs against the noise-free curves",
        "",
        *clean_md,
        "",
        "### Details (means over the successful seeds)",
        "",
        ("Reconstruction RMSE: at the observed points against the noisy observations (latent "
         "ODE: decoded from the posterior mean of z0; RNNs: the one-step predictions of "
         "observations 2 .. n). NFE: evaluations of the latent dynamics per training iteration "
         "(`backward` is 0 with direct backprop through the solver) and for one test-set "
         "evaluation over the 200-point grid."),
        "",
        *det_md,
        "",
        (f"Failed runs: {len(failed)} ("
         + "; ".join(f"{r['run']}: {r['error']}" for _, r in failed.iterrows()) + ")"
         if len(failed) else "Failed runs: none."),
        "",
        "## Figures",
        "",
        *[f"![{f}]({f})" for f in figures],
        "",
        ("Files: `table2.{md,csv}`, `table2_noise_free.csv`, `details.{md,csv}`, `runs.csv` "
         "(one row per run)."),
    ]
    (results / "README.md").write_text("\n".join(readme) + "\n")
    return True


# ---------------------------------------------------------------------------------------------

def _parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in split_list(text)]
    except ValueError:
        raise OptionError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise OptionError(f"--{what} is empty")
    return values


def _options(argv: list[str] | None):
    p = _Parser(prog="python -m nodebench.experiments.latent",
                description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    p.add_argument("--stages", default="train,report", help="train,report")
    p.add_argument("--models", default=",".join(MODELS), help="rnn,rnn_dt,latent_ode")
    p.add_argument("--n", default=None, help="observations per spiral, e.g. 30,50,100 "
                   "(default: the profile's)")
    p.add_argument("--seeds", default=None, help="seeds, e.g. 0,1 (default: the profile's)")
    p.add_argument("--runs", default=None, help=f"run folder (default runs/{NAME}-<profile>)")
    p.add_argument("--results", default=None, help=f"results folder (default results/{NAME} "
                   f"for cpu, results/{NAME}-<profile> otherwise)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the profile's, 1)")
    a = p.parse_args(argv)
    profile = PROFILES[a.profile]
    stages = split_list(a.stages)
    bad = sorted(set(stages) - set(STAGES))
    if bad or not stages:
        raise OptionError(f"unknown stage(s) {', '.join(bad) or '(none given)'}; choose from: "
                          + ", ".join(STAGES))
    models = split_list(a.models)
    bad = sorted(set(models) - set(MODELS))
    if bad or not models:
        raise OptionError(f"unknown model(s) {', '.join(bad) or '(none given)'}; choose from: "
                          + ", ".join(MODELS))
    window = spiral_config(profile).n_window
    ns = _parse_ints(a.n, "n") if a.n else list(N_VALUES)
    if any(not 2 <= n <= window for n in ns):
        raise OptionError(f"--n values must be in 2..{window} (observations out of the "
                          f"{window}-step window; the RNNs need 2 to predict one), got {a.n}")
    seeds = _parse_ints(a.seeds, "seeds") if a.seeds else list(profile["seeds"])
    if any(s < 0 for s in seeds):
        raise OptionError(f"--seeds must be non-negative, got {a.seeds}")
    if a.threads is not None and a.threads < 1:
        raise OptionError(f"--threads must be at least 1, got {a.threads}")
    if profile["cell"] not in CELLS:
        raise OptionError(f"profile cell {profile['cell']!r} not in {', '.join(CELLS)}")
    if profile["schedule"] not in ("constant", "cosine"):
        raise OptionError(f"profile schedule {profile['schedule']!r} not in constant, cosine")
    return a, profile, stages, models, sorted(set(ns)), sorted(set(seeds))


def main(argv: list[str] | None = None) -> int:
    try:
        a, profile, stages, models, ns, seeds = _options(argv)
    except OptionError as exc:
        print(f"python -m nodebench.experiments.latent: error: {exc}", file=sys.stderr)
        return 2
    _, runs, results = folders(NAME, a.profile, a.runs, a.results)
    torch.set_num_threads(a.threads or profile["threads"])
    started = time.perf_counter()
    print(f"[latent] profile {a.profile}: {profile['description']}", flush=True)
    if "train" in stages:
        stage_train(profile, runs, models, ns, seeds)
    if "report" in stages:
        if not report(runs, results, a.profile):
            return 1
        print(f"[latent] report written to {results}/", flush=True)
    print(f"[latent] done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
