"""The report of ``nodebench reproduce dupont2019_toys`` (and of its held-out-wedge study,
``dupont2019_wedge``): the toy experiments of Dupont, Doucet, Teh 2019, *Augmented Neural ODEs*,
Sections 3-4 (Figures 1, 3, 7-9), built from run records alone.

The runs are ordinary ``nodebench train`` runs (datasets ``g_1d``, ``annulus``,
``annulus_wedge``; models ``node_toy``, ``anode_toy`` (p = 1), ``anode2_toy``, ``anode5_toy``,
``resnet_toy``; task :class:`nodebench.tasks.PointRegression`). :func:`report` reads their
``summary.json``, ``metrics.csv`` (one row per epoch) and ``features.pt`` and writes into the
results folder:

- ``toys.md`` / ``toys.csv``: one row per dataset and model, mean ± std over the seeds
  (repeats): runs ok / failed, final training loss (mean of the last epoch's minibatch losses),
  training and test sign accuracy (fraction of points whose output has the target's sign), NFE
  per training iteration forward and backward at the first and at the last epoch, the solve
  checks at the end (runs whose reference and round-trip errors are under the threshold; the
  round-trip error, relative), the paper's claim beside each row.
- ``toys_<dataset>_training.png``: training loss, NFE forward and NFE backward per epoch (mean
  over seeds, band = min..max); ``toys_<dataset>_nfe_vs_loss.png`` (each point one epoch);
  ``toys_<dataset>_features.png``: h(1) of the lowest-seed ok run of each model;
  ``toys_g_1d_trajectories.png``: h(t) from -1 and 1.
- ``README.md``: the budget (epochs, batch, points, seeds, device, threads, wall time, load and
  the quiet-run verdict), the paper's and the replication's claims, and a verdict on each claim
  computed from the numbers.

:func:`wedge_report` writes ``wedge.md`` / ``wedge.csv`` / ``README.md`` for the held-out-wedge
study: held-out accuracy per model and tolerance, with the solve checks.

Raises nothing for a folder without toy runs (returns False, writes nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..tables import max_load, mean_std, quiet_verdict, save_figure

MODELS = {"node_toy": "NODE", "anode_toy": "ANODE p=1", "anode2_toy": "ANODE p=2",
          "anode5_toy": "ANODE p=5", "resnet_toy": "ResNet"}
DATASETS = ("g_1d", "annulus", "annulus_wedge", "rings_wedge")
TEST_SETS = {"g_1d": "the two points -1 and 1", "annulus": "a fresh sample (seed + 1)",
             "annulus_wedge": "the held-out wedge of angles [0, pi/5]",
             "rings_wedge": "the wedge [0, pi/5] of an independent sample (seed + 10000)"}
WEDGES = ("annulus_wedge", "rings_wedge")   # the held-out-wedge studies (wedge_report)
# What the paper (or the replication, docs/reference.md sections 2 and 5) says, beside each row.
CLAIMS = {
    ("g_1d", "node_toy"): "cannot represent g (the flow preserves order): maps -1 and 1 towards 0; "
                          "replication MSE 1.0001",
    ("g_1d", "anode_toy"): "represents g with one extra dimension (replication MSE about 0)",
    ("g_1d", "resnet_toy"): "discrete steps can cross: can represent g",
    ("annulus", "node_toy"): "loss plateaus, NFE grows during training",
    ("annulus", "anode_toy"): "near-zero loss, lower and steadier NFE",
    ("annulus", "anode2_toy"): "near-zero loss, lower and steadier NFE",
    ("annulus", "anode5_toy"): "near-zero loss, lower and steadier NFE (p = 5 best for d = 2)",
    ("annulus_wedge", "node_toy"): "held-out accuracy 0.619 (replication)",
    ("annulus_wedge", "anode5_toy"): "held-out accuracy 1.000 (replication)",
}
COLOURS = {"node_toy": "tab:red", "anode_toy": "tab:blue", "anode2_toy": "tab:cyan",
           "anode5_toy": "tab:green", "resnet_toy": "tab:gray"}
# The replication's held-out accuracies (reference.md section 5); its slice test trains NODE and
# ANODE with p = 2 on two thin circles (scripts/train_anode_slice_circles.py there).
REPLICATION_WEDGE = {"node_toy": 0.619, "anode2_toy": 1.000, "anode5_toy": 1.000}
# What differs from the replication's slice test, per wedge dataset (read from its script).
REPLICATION_NOTE = {
    "annulus_wedge": (
        "The replication's 0.619 is not from this data set. Its held-out-slice script "
        "(VanniLeonardo/re-augmented-neural-odes, scripts/train_anode_slice_circles.py) trains "
        "on two thin noisy circles (radius 1 and 0.5, Gaussian noise 0.05, 1,000 points, the "
        "slice [0, pi/5] removed), tests on the slice of an independent sample, reads out two "
        "logits with cross-entropy, and trains 200 epochs, NODE against ANODE with p = 2. Here the "
        "classes are Dupont et al.'s filled disk and outer ring, 0.5 apart, under the authors' "
        "epochs (30) and loss (SmoothL1), at the papers' tolerance 1e-3 and at the "
        "replication's 1e-6. `results/anode/rings/` (preset `dupont2019_rings`) runs the "
        "replication's geometry."),
    "rings_wedge": (
        "This is the replication's geometry (two thin circles, noise 0.05, 1,000 points, the "
        "slice of an independent sample), its epochs (200), its ANODE (p = 2) and its "
        "tolerance (1e-3); what still differs is the readout: a scalar linear readout with MSE "
        "here, two logits with cross-entropy there."),
}


def _metrics(run_dir: Path) -> pd.DataFrame:
    f = run_dir / "metrics.csv"
    return pd.read_csv(f) if f.exists() and f.stat().st_size else pd.DataFrame()


def load_runs(runs: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per toy run, one row per epoch of every run) from the run records under
    ``runs`` (summary.json and metrics.csv, searched recursively)."""
    rows, curves = [], []
    for path in sorted(Path(runs).rglob("summary.json")):
        s = json.loads(path.read_text())
        if s.get("model") not in MODELS or s.get("dataset") not in DATASETS:
            continue
        cfg = s.get("config") or {}
        trainer, solver = cfg.get("trainer") or {}, cfg.get("solver") or {}
        data_cfg = cfg.get("dataset") or {}
        m = _metrics(path.parent)
        row = {"dataset": s["dataset"], "model": s["model"], "seed": s.get("seed"),
               "status": s.get("status"), "error": s.get("error"), "params": s.get("params"),
               "epochs": s.get("epochs_done"), "iterations": s.get("iterations"),
               "train_loss": s.get("train_loss"), "test_loss": s.get("test_loss"),
               "test_accuracy": s.get("test_accuracy"),
               "train_accuracy": (float(m["train_accuracy"].dropna().iloc[-1])
                                  if "train_accuracy" in m and m["train_accuracy"].notna().any()
                                  else None),
               **{k: s.get(k) for k in ("nfe_eval", "valid", "validity_roundtrip_error",
                                        "validity_reference_error", "validity_threshold",
                                        "grad_rel_error_init", "grad_rel_error_final",
                                        "grad_cosine_final",
                                        "wall_time_s", "device", "threads", "load_start",
                                        "load_end", "train_size", "test_size", "solver_desc",
                                        "gradient")},
               "rtol": solver.get("rtol"), "batch": trainer.get("batch_size"),
               "planned_epochs": trainer.get("epochs"),
               "lr": ((cfg.get("optim") or {}).get("optimizer") or {}).get("lr"),
               "loss": (data_cfg.get("task") or {}).get("loss"),
               "run": str(path.parent.relative_to(runs)), "dir": str(path.parent)}
        for key in ("nfe_forward", "nfe_backward"):
            series = m[key].dropna() if key in m else pd.Series(dtype=float)
            row[f"{key}_first"] = float(series.iloc[0]) if len(series) else None
            row[f"{key}_last"] = float(series.iloc[-1]) if len(series) else None
        rows.append(row)
        for _, r in m.iterrows():
            curves.append({"dataset": s["dataset"], "model": s["model"], "seed": s.get("seed"),
                           "epoch": int(r["epoch"]), "train_loss": r.get("train_loss"),
                           "nfe_forward": r.get("nfe_forward"),
                           "nfe_backward": r.get("nfe_backward"),
                           "test_accuracy": r.get("test_accuracy")})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values(["dataset", "model", "seed"],
                                  key=lambda col: col.map(_rank))
    return frame.reset_index(drop=True), pd.DataFrame(curves)


def _rank(value):
    """Sort key: datasets and models in the paper's order, seeds as numbers."""
    if value in DATASETS:
        return DATASETS.index(value)
    if value in MODELS:
        return list(MODELS).index(value)
    return value


def _nfe_cell(g: pd.DataFrame, key: str) -> str:
    if g.empty or g.model.iloc[0] == "resnet_toy" or g[f"{key}_first"].isna().all():
        return "-"
    return f"{g[f'{key}_first'].mean():.1f} -> {g[f'{key}_last'].mean():.1f}"


def _valid_cell(g: pd.DataFrame) -> str:
    if g.empty or g.valid.isna().all():
        return "-"
    return f"{int(g.valid.fillna(False).astype(bool).sum())}/{len(g)}"


def _gradient_cell(g: pd.DataFrame) -> str:
    """The gradient error (relative, against float64 dopri5 1e-9 direct backprop) at
    initialisation and at the end, mean over the ok runs; '-' when not measured."""
    if g.empty or g.grad_rel_error_init.isna().all():
        return "-"
    return (f"{mean_std(g.grad_rel_error_init, '.1e')} / "
            f"{mean_std(g.grad_rel_error_final, '.1e')}")


def table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset and model: mean ± std over the ok runs (failed runs counted)."""
    out = []
    for (dataset, model), g in frame.groupby(["dataset", "model"], sort=False):
        ok = g[g.status == "ok"]
        failed = len(g) - len(ok)
        out.append({
            "dataset": dataset, "model": MODELS[model],
            "runs": f"{len(ok)} ok" + (f", {failed} failed" if failed else ""),
            "final train loss": mean_std(ok.train_loss, ".4f"),
            "train accuracy": mean_std(ok.train_accuracy, ".3f"),
            "test accuracy": mean_std(ok.test_accuracy, ".3f"),
            "test set": TEST_SETS[dataset] + (f" ({int(g.test_size.dropna().iloc[0]):,} points)"
                                              if g.test_size.notna().any() else ""),
            "NFE-F / iter, epoch 1 -> last": _nfe_cell(ok, "nfe_forward"),
            "NFE-B / iter, epoch 1 -> last": _nfe_cell(ok, "nfe_backward"),
            "solve valid": _valid_cell(ok),
            "round-trip error": mean_std(ok.validity_roundtrip_error, ".1e"),
            "grad. error init / end": _gradient_cell(ok),
            "paper's claim": CLAIMS.get((dataset, model), "-"),
            "failures": "; ".join(sorted({str(e) for e in g[g.status != "ok"].error.dropna()})),
        })
    return pd.DataFrame(out)


def _mean(frame: pd.DataFrame, dataset: str, model: str, column: str) -> float | None:
    g = frame[(frame.dataset == dataset) & (frame.model == model) & (frame.status == "ok")]
    values = pd.to_numeric(g[column], errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def verdicts(frame: pd.DataFrame) -> list[str]:
    """Sentences on the paper's and the replication's claims, computed from the numbers."""
    out = []

    def yes(flag: bool) -> str:
        return "holds" if flag else "does not hold"

    node_acc = _mean(frame, "g_1d", "node_toy", "test_accuracy")
    anode_acc = _mean(frame, "g_1d", "anode_toy", "test_accuracy")
    node_loss = _mean(frame, "g_1d", "node_toy", "train_loss")
    anode_loss = _mean(frame, "g_1d", "anode_toy", "train_loss")
    if None not in (node_acc, anode_acc, node_loss, anode_loss):
        out.append(f"g_1d: NODE's final loss {node_loss:.4f} and sign accuracy {node_acc:.3f} on "
                   f"the points -1 and 1 (it cannot represent g: {yes(node_acc < 1.0)}); ANODE "
                   f"(p = 1) {anode_loss:.2e} and {anode_acc:.3f} (it can: "
                   f"{yes(anode_acc == 1.0)}).")
    node_loss = _mean(frame, "annulus", "node_toy", "train_loss")
    anodes = [m for m in ("anode_toy", "anode2_toy", "anode5_toy")
              if _mean(frame, "annulus", m, "train_loss") is not None]
    if node_loss is not None and anodes:
        losses = {m: _mean(frame, "annulus", m, "train_loss") for m in anodes}
        out.append("annulus: final loss NODE {:.4f} against ANODE {} (NODE's loss stays "
                   "higher: {}).".format(node_loss, ", ".join(
                       f"{MODELS[m].split()[-1]} {v:.4f}" for m, v in losses.items()),
                       yes(all(node_loss > v for v in losses.values()))))
        nfe = {m: (_mean(frame, "annulus", m, "nfe_forward_first"),
                   _mean(frame, "annulus", m, "nfe_forward_last"))
               for m in ["node_toy", *anodes]}
        if all(None not in v for v in nfe.values()):
            growth = {m: last - first for m, (first, last) in nfe.items()}
            out.append("annulus: NFE forward per iteration from the first to the last epoch: "
                       + "; ".join(f"{MODELS[m]} {f:.1f} -> {la:.1f}"
                                   for m, (f, la) in nfe.items())
                       + " (NODE's NFE grow more than every ANODE's: "
                       + yes(all(growth["node_toy"] > growth[m] for m in anodes))
                       + "; NODE ends with more NFE than every ANODE: "
                       + yes(all(nfe["node_toy"][1] > nfe[m][1] for m in anodes)) + ").")
    for model, reference in REPLICATION_WEDGE.items():
        acc = _mean(frame, "annulus_wedge", model, "test_accuracy")
        if acc is not None:
            out.append(f"annulus_wedge: {MODELS[model]} classifies the held-out wedge at "
                       f"{acc:.3f} (replication {reference:.3f}).")
    invalid = frame[(frame.status == "ok") & (frame.valid == False)]
    checked = frame[(frame.status == "ok") & frame.valid.notna()]
    if len(checked):
        out.append(f"Solve checks at the end of training: {len(checked) - len(invalid)} of "
                   f"{len(checked)} ODE runs valid (reference and round-trip errors under "
                   f"{frame.validity_threshold.dropna().iloc[0]:g})"
                   + (": invalid " + ", ".join(sorted({f'{d} {MODELS[m]}' for d, m in
                                                       zip(invalid.dataset, invalid.model)}))
                      if len(invalid) else "") + ".")
    graded = frame[(frame.status == "ok") & frame.grad_rel_error_init.notna()] \
        if "grad_rel_error_init" in frame else frame.iloc[0:0]
    if len(graded):
        tiny = graded[graded.train_loss < 1e-6]
        rest = graded.drop(tiny.index)
        end = rest.grad_rel_error_final.dropna()
        out.append(
            f"Gradient error of the adjoint at rtol = atol "
            f"{graded.rtol.dropna().iloc[0]:g} against float64 dopri5 1e-9 direct backprop: "
            f"{graded.grad_rel_error_init.min():.1e} to {graded.grad_rel_error_init.max():.1e} "
            f"at initialisation"
            + (f", {end.min():.1e} to {end.max():.1e} at the end" if len(end) else "")
            + (f"; {len(tiny)} run(s) ended with a training loss under 1e-6 "
               f"({', '.join(sorted({f'{d} {MODELS[m]}' for d, m in zip(tiny.dataset, tiny.model)}))}"
               f"): their gradient is almost zero, so its relative error at the end "
               f"({tiny.grad_rel_error_final.min():.2g} to {tiny.grad_rel_error_final.max():.2g}) "
               f"measures solver noise, not a usable gradient" if len(tiny) else "") + ".")
    failed = frame[frame.status != "ok"]
    if len(failed):
        out.append(f"{len(failed)} run(s) failed and are counted, not averaged: "
                   + "; ".join(f"{d} {MODELS[m]} seed {s}: {e}" for d, m, s, e in
                               zip(failed.dataset, failed.model, failed.seed, failed.error)) + ".")
    return out


def _band(ax, curves: pd.DataFrame, column: str, label: str, colour: str) -> None:
    """Mean over seeds per epoch and the min..max band."""
    c = curves.groupby("epoch")[column].agg(["mean", "min", "max"]).dropna()
    if c.empty:
        return
    ax.plot(c.index, c["mean"], color=colour, label=label)
    ax.fill_between(c.index, c["min"], c["max"], color=colour, alpha=0.2)


def _features(run_dir: str) -> dict | None:
    f = Path(run_dir) / "features.pt"
    return torch.load(f, weights_only=True) if f.exists() else None


def _first_ok(frame: pd.DataFrame, dataset: str, model: str):
    g = frame[(frame.dataset == dataset) & (frame.model == model) & (frame.status == "ok")]
    g = g[[(Path(d) / "features.pt").exists() for d in g.dir]] if len(g) else g
    return None if g.empty else g.sort_values("seed").iloc[0]


def figures(frame: pd.DataFrame, curves: pd.DataFrame, results: Path) -> list[str]:
    """The training, NFE-vs-loss, features and g_1d trajectory figures (file names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for dataset in [d for d in DATASETS if d in set(frame.dataset)]:
        models = [m for m in MODELS if ((frame.dataset == dataset) & (frame.model == m)).any()]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        fig2, ax2 = plt.subplots(figsize=(5.5, 4))
        for model in models:
            c = curves[(curves.dataset == dataset) & (curves.model == model)]
            g = frame[(frame.dataset == dataset) & (frame.model == model)]
            label = f"{MODELS[model]} ({(g.status == 'ok').sum()}/{len(g)} ok)"
            _band(axes[0], c, "train_loss", label, COLOURS[model])
            if model == "resnet_toy":
                continue
            _band(axes[1], c, "nfe_forward", label, COLOURS[model])
            _band(axes[2], c, "nfe_backward", label, COLOURS[model])
            for i, (_, cs) in enumerate(c.groupby("seed")):
                ax2.plot(cs.nfe_forward, cs.train_loss, "o-", ms=3, color=COLOURS[model],
                         alpha=0.6, label=MODELS[model] if i == 0 else None)
        for ax, title in zip(axes, ("training loss", "NFE forward / iteration",
                                    "NFE backward (adjoint) / iteration")):
            ax.set_xlabel("epoch")
            ax.set_title(f"{dataset}: {title}")
            if ax.has_data():
                ax.legend(fontsize=7)
        axes[0].set_yscale("log")
        fig.suptitle("mean over seeds per epoch, band = min..max")
        fig.tight_layout()
        fig.savefig(results / f"toys_{dataset}_training.png", dpi=110)
        plt.close(fig)
        made.append(f"toys_{dataset}_training.png")
        ax2.set_xlabel("NFE forward / iteration (epoch mean)")
        ax2.set_ylabel("training loss (epoch mean)")
        ax2.set_yscale("log")
        ax2.set_title(f"{dataset}: NFE against loss, one point per epoch")
        made.append(save_figure(fig2, ax2, results / f"toys_{dataset}_nfe_vs_loss.png", dpi=110))
        made.append(_feature_figure(frame, dataset, models, results))
    if (frame.dataset == "g_1d").any():
        made.append(_trajectory_figure(frame, results))
    return made


def _feature_figure(frame: pd.DataFrame, dataset: str, models: list[str], results: Path) -> str:
    """h(1) of the lowest-seed ok run of each model, coloured by target (x: test points)."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(4 * len(models), 4))
    for k, model in enumerate(models):
        r = _first_ok(frame, dataset, model)
        f = None if r is None else _features(r.dir)
        dim = None if f is None else f["features"].shape[1]
        ax = fig.add_subplot(1, len(models), k + 1, projection="3d" if dim and dim >= 3 else None)
        if f is None:
            ax.set_title(f"{MODELS[model]}: no ok run")
            continue
        for feats, y, marker, alpha in ((f["features"], f["y"], "o", 0.5),
                                        (f["test_features"], f["test_y"], "x", 0.9)):
            if dataset != "annulus_wedge" and marker == "x":
                continue
            colour = np.where(y.flatten().numpy() > 0, "tab:orange", "tab:blue")
            pts = feats.numpy()
            cols = [pts[:, i] if i < pts.shape[1] else np.zeros(len(pts))
                    for i in range(min(max(pts.shape[1], 2), 3))]
            extra = {"depthshade": False} if len(cols) == 3 else {}
            ax.scatter(*cols, c=colour, s=8, marker=marker, alpha=alpha, **extra)
        ax.set_title(f"{MODELS[model]} (seed {r.seed}): h(1), dims {min(dim, 3)} of {dim}",
                     fontsize=9)
    fig.suptitle(f"{dataset}: features at t = 1 (blue target -1, orange +1"
                 + ("; x = held-out wedge" if dataset == "annulus_wedge" else "") + ")")
    fig.tight_layout()
    name = f"toys_{dataset}_features.png"
    fig.savefig(results / name, dpi=110)
    plt.close(fig)
    return name


def _trajectory_figure(frame: pd.DataFrame, results: Path) -> str:
    """g_1d: the first coordinate of h(t) (ODE models) or of each block's state (ResNet)."""
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if ((frame.dataset == "g_1d") & (frame.model == m)).any()]
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.5))
    for ax, model in zip(np.atleast_1d(axes), models):
        r = _first_ok(frame, "g_1d", model)
        f = None if r is None else _features(r.dir)
        if f is None:
            ax.set_title(f"{MODELS[model]}: no ok run")
            continue
        traj, y = f["trajectory"].numpy(), f["y"][f["traj_index"]].flatten().numpy()
        t = np.arange(traj.shape[0]) if model == "resnet_toy" else np.linspace(0, 1, traj.shape[0])
        for j in range(traj.shape[1]):
            ax.plot(t, traj[:, j, 0], color="tab:orange" if y[j] > 0 else "tab:blue", alpha=0.5)
        ax.set_xlabel("block" if model == "resnet_toy" else "t")
        ax.set_ylabel("h(t)[0] (the output)")
        ax.set_title(f"{MODELS[model]} (seed {r.seed})")
    fig.suptitle("g_1d: trajectories from x = -1 (orange, target +1) and x = 1 (blue, target -1)")
    fig.tight_layout()
    fig.savefig(results / "toys_g_1d_trajectories.png", dpi=110)
    plt.close(fig)
    return "toys_g_1d_trajectories.png"


def budget(frame: pd.DataFrame, profile: str, results: Path) -> str:
    """The budget line: epochs, batch, optimiser, loss, solver, seeds, device, threads, wall
    time, load and the quiet-run verdict."""
    r = frame.iloc[0]
    seeds = sorted(frame.seed.unique())
    epochs = sorted({int(e) for e in frame.planned_epochs.dropna()})
    text = (f"Budget (profile `{profile}`): {'/'.join(map(str, epochs))} epochs at batch "
            f"{r['batch']}, Adam {r['lr']:g}, loss {r['loss']}, {r['solver_desc']} "
            f"(ResNet: no solver), {r['gradient']} gradients; seeds {seeds[0]}..{seeds[-1]} "
            f"({len(seeds)} repeats: a new data sample and initialisation each); "
            f"{r['device']}, {r['threads']} thread(s) per run, two runs at a time; "
            f"{len(frame)} runs, {frame.wall_time_s.sum():.0f} s of run wall time in all; "
            f"1-min load at the runs' start/end at most {max_load(frame):.2f}. Paper: 50 "
            f"epochs, 20 repeats (the authors' config: 30 and 10).")
    quiet = quiet_verdict(results)
    return text + (f" Machine: `{quiet}`" if quiet else "")


def report(runs: Path, results: Path, profile: str) -> bool:
    """Write the toy report (tables, figures, README.md) from the run records under ``runs``
    into ``results``. Returns False, writing nothing, when there is no toy run record."""
    runs, results = Path(runs), Path(results)
    frame, curves = load_runs(runs)
    if frame.empty:
        return False
    results.mkdir(parents=True, exist_ok=True)
    rows = table(frame)
    rows.to_csv(results / "toys.csv", index=False)
    frame.drop(columns=["load_start", "load_end", "dir"]).to_csv(results / "toys_runs.csv",
                                                                 index=False)
    line = budget(frame, profile, results)
    md = rows.drop(columns=["failures"] if not rows.failures.any() else []).to_markdown(
        index=False, disable_numparse=True)
    (results / "toys.md").write_text(f"# ANODE toys (Dupont et al. 2019, Sections 3-4)\n\n"
                                     f"{line}\n\n{md}\n")
    made = figures(frame, curves, results) if not curves.empty else []
    readme = ["# Augmented Neural ODEs: the toy experiments", "",
              ("Made by `nodebench reproduce dupont2019_toys` from the run records alone "
               "(`nodebench/experiments/anode_toys_report.py`); table `toys.md` (`toys.csv`; per "
               "run `toys_runs.csv`)."), "", line, "", "## What these runs say", "",
              *[f"- {v}" for v in verdicts(frame)], "", "## Table", "", md, "",
              "## Figures", "", *[f"![{f}]({f})" for f in made], ""]
    (results / "README.md").write_text("\n".join(readme))
    return True


def _by_model_and_tolerance(frame: pd.DataFrame):
    """``((model, rtol), rows)`` groups, models in the paper's order, the loosest rtol first."""
    order = frame.assign(_m=frame.model.map(_rank), _t=-frame.rtol.astype(float))
    order = order.sort_values(["_m", "_t", "seed"], kind="stable").drop(columns=["_m", "_t"])
    return order.groupby(["model", "rtol"], sort=False)


def wedge_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model and tolerance of the held-out-wedge study (models in the paper's order,
    the loosest tolerance first)."""
    out = []
    for (model, rtol), g in _by_model_and_tolerance(frame):
        ok = g[g.status == "ok"]
        failed = len(g) - len(ok)
        out.append({
            "model": MODELS[model], "rtol = atol": f"{rtol:g}",
            "runs": f"{len(ok)} ok" + (f", {failed} failed" if failed else ""),
            "held-out accuracy": mean_std(ok.test_accuracy, ".3f"),
            "held-out accuracy per seed": ", ".join(f"{a:.3f}" for a in ok.test_accuracy),
            "final train loss": mean_std(ok.train_loss, ".4f"),
            "train accuracy": mean_std(ok.train_accuracy, ".3f"),
            "NFE-F / iter, last epoch": mean_std(ok.nfe_forward_last, ".1f"),
            "solve valid": _valid_cell(ok),
            "round-trip error": mean_std(ok.validity_roundtrip_error, ".1e"),
            "grad. error init / end": _gradient_cell(ok),
            "replication": (f"{REPLICATION_WEDGE[model]:.3f}" if model in REPLICATION_WEDGE
                            else "-"),
        })
    return pd.DataFrame(out)


def wedge_report(runs: Path, results: Path, profile: str) -> bool:
    """The held-out-wedge study (preset ``dupont2019_wedge``): ``wedge.md``, ``wedge.csv``,
    ``wedge_runs.csv`` and ``README.md`` in ``results``. Returns False when there is no run."""
    runs, results = Path(runs), Path(results)
    frame, _ = load_runs(runs)
    frame = frame[frame.dataset.isin(WEDGES)] if not frame.empty else frame
    if frame.empty:
        return False
    results.mkdir(parents=True, exist_ok=True)
    rows = wedge_table(frame)
    rows.to_csv(results / "wedge.csv", index=False)
    frame.drop(columns=["load_start", "load_end", "dir"]).to_csv(results / "wedge_runs.csv",
                                                                 index=False)
    line = budget(frame, profile, results)
    r = frame.iloc[0]
    data = ("the annulus (Dupont et al.'s filled disk |x| <= 0.5 and ring 1 <= |x| <= 1.5) with "
            "the wedge [0, pi/5] held out" if r["dataset"] == "annulus_wedge" else
            "two thin noisy circles (radius 1 and 0.5, noise 0.05: the replication's geometry) "
            "with the wedge [0, pi/5] held out; the test set is the wedge of an independent "
            "sample")
    setup = (f"Data: {data}, {int(r['train_size']):,} training points, {int(r['test_size']):,} "
             f"held-out points (seed 0; the sample follows the seed); linear readout to a "
             f"scalar target -1 / +1; loss {r['loss']}.")
    md = rows.to_markdown(index=False, disable_numparse=True)
    (results / "wedge.md").write_text(f"# The held-out wedge (Dupont et al. 2019; replication)\n\n"
                                      f"{line}\n\n{setup}\n\n{md}\n")
    lines = []
    for (model, rtol), g in _by_model_and_tolerance(frame[frame.status == "ok"]):
        acc = g.test_accuracy.mean()
        ref = REPLICATION_WEDGE.get(model)
        lines.append(f"{MODELS[model]} at rtol = atol = {rtol:g}: held-out accuracy {acc:.3f} "
                     f"over {len(g)} seeds (min {g.test_accuracy.min():.3f})"
                     + (f"; replication {ref:.3f}" if ref is not None else "") + ".")
    rings = r["dataset"] == "rings_wedge"
    title, preset = (("the replication's two thin circles", "dupont2019_rings") if rings else
                     ("NODE vs ANODE under the authors' training setup", "dupont2019_wedge"))
    readme = [f"# The held-out wedge: {title}", "",
              (f"Made by `nodebench reproduce {preset}` from the run records alone "
               "(`nodebench/experiments/anode_toys_report.py`: wedge_report); table `wedge.md`."),
              "", line, "", setup, "", "## What these runs say", "", *[f"- {v}" for v in lines],
              "", "## Against the replication", "", REPLICATION_NOTE[r["dataset"]], "",
              "## Table", "", md, ""]
    (results / "README.md").write_text("\n".join(readme))
    return True
