"""The report of ``nodebench reproduce chen2018_table2`` (``make reproduce-latent``): latent ODE vs
RNN on noisy 2-D spirals, Table 2 of Chen et al. 2018 (predictive RMSE on the test set with
n = 30, 50, 100 of 100 observations; docs/reference.md, "Table 2").

The runs are ordinary ``nodebench train`` runs (task :class:`nodebench.tasks.LatentSequence`,
dataset ``spirals``, models ``rnn``, ``rnn_dt``, ``latent_ode``; preset
``conf/experiment/chen2018_table2.yaml`` and its profiles). :func:`report` reads only their run
records (summary.json, metrics.csv, predictions.pt) and writes Table 2 (Markdown + CSV) with the
paper's values in separate rows, a details table, figures (PNG) and README.md.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..latent import MODELS
from ..tables import max_load, mean_std, quiet_verdict
from ..tasks import FAILED_NOISE_MULTIPLE

# Chen et al. 2018, Table 2: predictive RMSE on the test set, by number of observations.
PAPER_RMSE = {"rnn": {30: 0.3937, 50: 0.3202, 100: 0.1813},
              "latent_ode": {30: 0.1642, 50: 0.1502, 100: 0.1346}}
TITLES = {"rnn": "RNN", "rnn_dt": "RNN + time gaps", "latent_ode": "Latent ODE"}


def _collect(runs: Path):
    """One row per run record under ``runs``: model, n (observations per spiral), seed, status,
    the test metrics, the final training loss, NFE, iterations, parameters, wall time; the run
    folder (relative to ``runs``) in ``run``. (None, None) when there is none."""
    import pandas as pd

    rows, first = [], None
    for path in sorted(runs.rglob("summary.json")):
        s = json.loads(path.read_text())
        if s.get("task") != "latent":
            continue
        first = first or s
        c = s["config"]
        rows.append({"model": s["model"], "n": int(c["dataset"]["n_obs"]), "seed": s["seed"],
                     "status": s["status"], "error": s.get("error"),
                     **{k: s.get(k) for k in ("test_rmse", "test_rmse_clean", "recon_rmse",
                                              *BREAKDOWN,
                                              "nfe_forward", "nfe_backward", "nfe_eval",
                                              "iterations", "params", "wall_time_s",
                                              "validity_reference_error",
                                              "validity_roundtrip_error", "valid",
                                              "grad_rel_error_init", "grad_rel_error_final",
                                              "load_start", "load_end", "threads")},
                     "final_loss": s.get("train_loss"), "epochs": c["trainer"]["epochs"],
                     "run": str(path.parent.relative_to(runs))})
    if not rows:
        return None, None
    frame = pd.DataFrame(rows).sort_values(["model", "n", "seed"], kind="stable")
    return frame.reset_index(drop=True), first


# where the extrapolation error comes from (nodebench.latent.extrapolation_breakdown)
BREAKDOWN = ("test_rmse_median", "test_rmse_cw", "test_rmse_ccw", "test_failed_share")


def _breakdown(frame) -> tuple[list[str], list[dict]]:
    """Per (model, n), means ± std over the ok seeds: pooled test RMSE, median per-spiral RMSE,
    RMSE of the clockwise and counter-clockwise spirals, share of failed spirals (per seed in
    brackets). Empty when the runs predate these columns."""
    if not all(k in frame and frame[k].notna().any() for k in BREAKDOWN):
        return [], []
    head = ["model", "n", "test RMSE (pooled)", "median per-spiral RMSE", "clockwise spirals",
            "counter-clockwise spirals", "failed spirals % (per seed)"]
    md = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows = []
    for model in MODELS:
        for n in sorted(frame["n"].unique()):
            ok = frame[(frame["model"] == model) & (frame["n"] == n) & (frame["status"] == "ok")]
            if ok.empty or ok["test_rmse_median"].isna().all():
                continue
            share = ", ".join(f"{100 * v:.0f}" for v in ok["test_failed_share"])
            md.append(f"| {TITLES[model]} | {int(n)} | {_pm(ok['test_rmse'].tolist())} | "
                      f"{_pm(ok['test_rmse_median'].tolist())} | "
                      f"{_pm(ok['test_rmse_cw'].tolist())} | {_pm(ok['test_rmse_ccw'].tolist())} | "
                      f"{100 * ok['test_failed_share'].mean():.1f} ({share}) |")
            rows.append({"model": model, "n": int(n),
                         **{k: float(ok[k].mean()) for k in ("test_rmse", *BREAKDOWN)}})
    return md, rows


def _pm(values) -> str:
    return mean_std(values, ".4f", single="{mean} (1 seed)")


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


# issue 18's targets: the latent ODE's test RMSE at most this at every n, and both RNNs at least
# this many times worse than the latent ODE at n = 30
TARGET_RMSE, TARGET_RATIO, RATIO_N = 0.20, 1.5, 30


def verdicts(frame) -> list[str]:
    """One sentence per target (``TARGET_RMSE``, ``TARGET_RATIO``), computed from the mean test
    RMSE of the ok runs of each model and n."""
    ok = frame[frame["status"] == "ok"]
    mean = ok.groupby(["model", "n"])["test_rmse"].mean()
    out = []
    for n in sorted(int(v) for v in frame["n"].unique()):
        if ("latent_ode", n) in mean:
            v = float(mean[("latent_ode", n)])
            out.append(f"Latent ODE at n = {n}: test RMSE {v:.4f} against at most "
                       f"{TARGET_RMSE:.2f}: " + ("met." if v <= TARGET_RMSE else "NOT met."))
    if ("latent_ode", RATIO_N) in mean:
        base = float(mean[("latent_ode", RATIO_N)])
        for model in ("rnn", "rnn_dt"):
            if (model, RATIO_N) in mean:
                ratio = float(mean[(model, RATIO_N)]) / base
                out.append(f"{TITLES[model]} at n = {RATIO_N}: {ratio:.2f}x the latent ODE's "
                           f"RMSE against at least {TARGET_RATIO:g}x: "
                           + ("met." if ratio >= TARGET_RATIO else "NOT met."))
    return out


def _details(frame) -> tuple[list[str], object]:
    """Per (model, n): all the measured quantities, means over the successful seeds."""
    import pandas as pd

    head = ["model", "n", "seeds ok / run", "test RMSE (noisy)", "test RMSE (noise-free)",
            "reconstruction RMSE", "final train loss: -ELBO / NLL",
            "NFE forward / backward per iteration (last epoch)", "NFE eval",
            "solve valid (runs; worst reference / round-trip error)",
            "grad. error init / end", "iterations", "params", "wall s per run"]
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
                "(-ELBO per spiral)" if model == "latent_ode" else "(NLL per point)")
            md.append(
                f"| {TITLES[model]} | {int(n)} | {len(ok)} / {len(r)} | "
                f"{_pm(ok['test_rmse'].tolist())} | {_pm(ok['test_rmse_clean'].tolist())} | "
                f"{_pm(ok['recon_rmse'].tolist())} | {loss} | {nfe} | "
                + (f"{mean['nfe_eval']:.0f}" if model == "latent_ode" and len(ok) else "-")
                + f" | {_validity(ok) if model == 'latent_ode' else '-'}"
                + f" | {_grad_cell(r, ok) if model == 'latent_ode' else '-'}"
                + f" | {int(r['iterations'].fillna(0).max())} | {int(r['params'].iloc[0])} | "
                f"{r['wall_time_s'].mean():.0f} |"
                + (f" failed: {'; '.join(errors)}" if errors else ""))
            rows.append({"model": model, "n": int(n), "seeds_ok": len(ok), "seeds_run": len(r),
                         **{k: mean.get(k) for k in ("test_rmse", "test_rmse_clean",
                                                     "recon_rmse", "final_loss", "nfe_forward",
                                                     "nfe_backward", "nfe_eval",
                                                     "validity_reference_error",
                                                     "validity_roundtrip_error",
                                                     "grad_rel_error_init",
                                                     "grad_rel_error_final")},
                         "valid_runs": int(ok["valid"].fillna(False).astype(bool).sum())
                         if "valid" in ok else None,
                         "iterations": int(r["iterations"].fillna(0).max()),
                         "params": int(r["params"].iloc[0]),
                         "wall_time_s": float(r["wall_time_s"].mean()),
                         "errors": "; ".join(errors)})
    return md, pd.DataFrame(rows)


def _grad_cell(r, ok) -> str:
    """'init / end' relative gradient error of the latent ODE (mean ± std over seeds; issue 13):
    the run's parameter gradient of the -ELBO (reparameterisation noise fixed by a seeded
    generator) against float64 dopri5 1e-9 direct backprop on the first test spirals; '-' where
    the runs did not measure it (``trainer.instruments.gradient_error`` off)."""
    if "grad_rel_error_init" not in r or r["grad_rel_error_init"].isna().all():
        return "-"
    return (f"{mean_std(r['grad_rel_error_init'], '.2e', std_fmt='.1e')} / "
            f"{mean_std(ok['grad_rel_error_final'], '.2e', std_fmt='.1e')}")


def _validity(ok) -> str:
    """'k/n valid (worst reference / round-trip error)' of the runs' last solve checks (the
    latent ODE's solve over the whole grid from the posterior means: tasks.LatentSequence)."""
    if "valid" not in ok or ok["valid"].isna().all():
        return "-"
    good = int(ok["valid"].fillna(False).astype(bool).sum())
    return (f"{good}/{len(ok)} ({ok['validity_reference_error'].max():.1e} / "
            f"{ok['validity_roundtrip_error'].max():.1e})")


def _budget(frame, first: dict, profile_name: str, results: Path) -> str:
    """The training budget, from the first run record's config (the same for every run)."""
    c = first["config"]
    d, t, solver = c["dataset"], c["trainer"], c["solver"]
    seeds = sorted(int(x) for x in frame["seed"].unique())
    per_epoch = d["n_train"] // t["batch_size"]
    return (
        f"Budget (profile `{profile_name}`): {t['epochs']} epochs of {per_epoch} batches "
        f"({t['epochs'] * per_epoch} iterations) per run, {c['optim']['name']} lr "
        f"{c['optim']['optimizer']['lr']:g}, batch {t['batch_size']} spirals; data "
        f"{d['n_spirals']} spirals ({d['n_train']} train / {d['n_spirals'] - d['n_train']} "
        f"test), {d['n_window']} observation + {d['n_extrap']} extrapolation steps of "
        f"{d['dt']:g}, {d['turns']:g} turn per window, noise std {d['noise']:g}, spiral family "
        f"`{d.get('family', 'independent')}`; latent ODE "
        f"likelihood std {d['task']['obs_std']:g}, {solver['method']} rtol {solver['rtol']:g} "
        f"atol {solver['atol']:g} (at most {solver['max_num_steps']} steps between output "
        f"times); seeds {', '.join(map(str, seeds))}; device {first['device']}; wall time "
        f"{frame['wall_time_s'].sum():.0f} s summed over the runs; 1-min load at the runs' "
        f"start/end at most {max_load(frame):.2f}."
        + (f" Machine: `{quiet}`" if (quiet := quiet_verdict(results)) else ""))


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
            match = frame[(frame["model"] == model) & (frame["n"] == n)
                          & (frame["seed"] == seed)]
            path = runs / str(match["run"].iloc[0]) / "predictions.pt" if len(match) else None
            if path is not None and path.exists():
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
            m["iteration"] = m["epoch"] * m["iterations"]  # iterations per epoch
            m["loss"] = m["train_loss"]
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
                                 + ("-ELBO per spiral\n(y range: the last 3/4 of the run)"
                                    if model == "latent_ode"
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
        print(f"[latent] report: no latent run records (summary.json) in {runs}/",
              file=sys.stderr)
        return False
    results.mkdir(parents=True, exist_ok=True)
    frame.to_csv(results / "runs.csv", index=False)
    budget = _budget(frame, first, profile_name, results)
    t2_md, t2_rows = _table2(frame, "test_rmse")
    clean_md, clean_rows = _table2(frame, "test_rmse_clean")
    pd.DataFrame(t2_rows).to_csv(results / "table2.csv", index=False)
    pd.DataFrame(clean_rows).to_csv(results / "table2_noise_free.csv", index=False)
    s = first["config"]["dataset"]
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
    where_md, where_rows = _breakdown(frame)
    if where_rows:
        pd.DataFrame(where_rows).to_csv(results / "breakdown.csv", index=False)
    where = [] if not where_md else [
        "### Where the extrapolation error comes from",
        "",
        ("The same test predictions split up (means ± std over the ok seeds): the median over "
         "the test spirals of each spiral's RMSE, the pooled RMSE of the clockwise and of the "
         "counter-clockwise spirals, and the share of test spirals whose RMSE exceeds "
         f"{FAILED_NOISE_MULTIPLE:g}x the noise std (failed). A pooled RMSE well above the "
         "median means most spirals are extrapolated well and a few are far off. "
         "`breakdown.csv`."),
        "",
        *where_md,
        "",
    ]
    readme = [
        "# Latent ODE vs RNN on spirals (Chen et al. 2018, Table 2), measured",
        "",
        ("Made by `make reproduce-latent` (`nodebench reproduce chen2018_table2 profile="
         f"{profile_name}`); every number below comes from the run folders' `summary.json` and "
         "`metrics.csv`, re-aggregated by the report."),
        "",
        budget,
        "",
        "Targets (issue 18), from the mean test RMSE over the ok seeds:",
        "",
        *[f"- {v}" for v in verdicts(frame)],
        "",
        heading,
        "",
        note,
        "",
        *t2_md,
        "",
        *where,
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
         "evaluation over the 200-point grid. Grad. error: relative error of the parameter "
         "gradient of the -ELBO on the first 16 test spirals (reparameterisation noise fixed) "
         "against a float64 dopri5 rtol = atol = 1e-9 direct-backprop reference at the same "
         "weights, at initialisation / at the end of training (the run's gradient is direct "
         "backprop through dopri5 at the run's tolerances)."),
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
        ("Files: `table2.{md,csv}`, `table2_noise_free.csv`, `details.{md,csv}`, "
         "`breakdown.csv`, `runs.csv` (one row per run)."),
    ]
    (results / "README.md").write_text("\n".join(readme) + "\n")
    return True
