"""The report step: comparison tables and figures built only from run directories.

``collect(runs)`` reads every ``summary.json`` under the given folders into one row per run;
``aggregate`` groups runs by configuration (model, solver, gradient, dataset, budget) and gives
mean ± std over seeds with the count, failed runs counted and shown, never averaged in.
``report_mnist`` adds Table 1's paper columns (Chen et al. 2018) beside the measured ones and the
memory-scaling and Figure 3 outputs. The same run directories always give byte-identical tables:
rows are sorted, floats printed with fixed precision, and no clock time is printed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from .tables import mean_std, quiet_verdict, shown_path

GROUP_KEYS = ["model", "solver_desc", "gradient", "dataset", "train_size", "epochs", "batch",
              "setting"]
MEASURED = ["test_error", "best_test_error", "nfe_forward", "nfe_backward", "activation_mib",
            "epoch_time_s", "iter_s"]
# Solve checks (issue 13): from summary.json, or from checks.json (`nodebench check`)
CHECK_FIELDS = ["validity_reference_error", "validity_roundtrip_error", "valid",
                "grad_rel_error_init", "grad_cosine_init", "grad_rel_error_final",
                "grad_cosine_final"]

# Chen et al. 2018, Table 1 (MNIST). Paper values, shown only in "paper" columns.
PAPER_TABLE1 = {
    "mlp": {"paper test error": "1.60%", "paper params": "0.24 M", "paper memory": "-",
            "paper time": "-"},
    "resnet": {"paper test error": "0.41%", "paper params": "0.60 M", "paper memory": "O(L)",
               "paper time": "O(L)"},
    "rknet": {"paper test error": "0.47%", "paper params": "0.22 M", "paper memory": "O(L~)",
              "paper time": "O(L~)"},
    "odenet": {"paper test error": "0.42%", "paper params": "0.22 M", "paper memory": "O(1)",
               "paper time": "O(L~)"},
}
MODEL_ORDER = ["mlp", "resnet", "rknet", "odenet", "control", "anode"]
MODEL_LABEL = {"mlp": "1-layer MLP", "resnet": "ResNet", "rknet": "RK-Net", "odenet": "ODE-Net",
               "control": "Control: stem + head, no ODE block", "anode": "ANODE"}


# Config keys that do not change a run's numbers: runs differing only in these share a row.
NOT_A_SETTING = ("seed", "experiment", "group", "reproduce", "paths.", "trainer.progress", "trainer.threads",
                 "trainer.device", "trainer.log_every", "trainer.resume", "trainer.checkpoint",
                 "trainer.save_model", "trainer.instruments.", "trainer.channels_last",
                 "dataset.root", "dataset.check", "hydra.")


def _settings(cfg: dict) -> dict:
    """The run's config flattened to dotted keys (the trainer's own flattening, which its resume
    check compares), less the keys that do not change a run's numbers."""
    from .train import _flat

    return {k: v for k, v in _flat(cfg).items() if not k.startswith(NOT_A_SETTING)}


def collect(runs: list[Path] | Path, quiet: bool = False) -> pd.DataFrame:
    """One row per ``nodebench train`` run directory (its summary.json, searched recursively).

    Run records of other writers (the ANODE, dynamics, latent, shapes and expressivity drivers
    have their own reports) are skipped, and one line on stderr says how many and why. The
    ``setting`` column lists, per run, the settings (config keys, seed excluded) that differ
    between runs of the same model, so that rows are keyed by every setting that differs.
    """
    import sys

    folders = [Path(r) for r in (runs if isinstance(runs, (list, tuple)) else [runs])]
    rows, skipped, settings = [], [], []
    for folder in folders:
        for path in sorted(folder.rglob("summary.json")):
            try:
                s = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                skipped.append(f"{path} (unreadable)")
                continue
            cfg = s.get("config") if isinstance(s, dict) else None
            if not isinstance(cfg, dict) or not isinstance(cfg.get("trainer"), dict) \
                    or not s.get("model"):
                skipped.append(str(path.parent))
                continue
            row = {k: s.get(k) for k in ["status", "error", "model", "solver", "solver_desc",
                                          "gradient", "dataset", "seed", "params", "train_size",
                                          "test_size", "device", "wall_time_s", "epochs_done",
                                          "best_epoch", "iterations", "threads", "contended",
                                          *MEASURED]}
            # solve validity and gradient error (issue 13): the trainer's, else `nodebench check`'s
            checks = _read_checks(path.parent)
            for key in CHECK_FIELDS:
                row[key] = s.get(key) if s.get(key) is not None else checks.get(key)
            row["load_start"] = (s.get("load_start") or [None])[0]
            row["load_end"] = (s.get("load_end") or [None])[0]
            trainer = cfg["trainer"]
            row["epochs"] = trainer.get("epochs", s.get("epochs_done"))
            row["batch"] = trainer.get("batch_size")
            if row["iterations"] is None and row["batch"] and row["train_size"] \
                    and row["epochs_done"] is not None:   # records written before it was kept
                per_epoch = row["train_size"] // row["batch"]
                if trainer.get("max_batches"):
                    per_epoch = min(per_epoch, trainer["max_batches"])
                row["iterations"] = row["epochs_done"] * per_epoch
            row["run"] = str(path.parent)
            rows.append(row)
            settings.append(_settings(cfg))
    if skipped and not quiet:
        print(f"nodebench report: skipped {len(skipped)} run record(s) not written by "
              f"`nodebench train` (their drivers' reports read them): "
              f"{', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}", file=sys.stderr)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["setting"] = _differing(df, settings)
    for key in ("solver_desc", "gradient"):
        df[key] = df[key].fillna("-")
    return df.sort_values(["model", "solver_desc", "gradient", "setting", "seed", "run"],
                          key=lambda c: c.map(_order) if c.name == "model" else c,
                          kind="stable").reset_index(drop=True)


def _read_checks(run_dir: Path) -> dict:
    """The run's checks.json (written by `nodebench check`), or {}."""
    try:
        found = json.loads((run_dir / "checks.json").read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _differing(df: pd.DataFrame, settings: list[dict]) -> list[str]:
    """Per run, 'key=value, ...' for the settings that differ between runs of its model."""
    out = [""] * len(df)
    for idx in df.groupby("model", sort=False).groups.values():
        idx = list(idx)
        keys = sorted({k for i in idx for k in settings[i]})
        varying = [k for k in keys if len({json.dumps(settings[i].get(k), default=str)
                                           for i in idx}) > 1]
        for i in idx:
            out[i] = ", ".join(f"{k.split('.', 1)[-1] if k.startswith('model.') else k}="
                               f"{settings[i].get(k)}" for k in varying)
    return out


def _order(model: str) -> int:
    return MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)


def _fmt(values, digits: int, spec: str = "f") -> str:
    """'mean ± std' over the ok runs (just the value for one run); '-' when there is none;
    numbers formatted ``.{digits}{spec}`` (``spec="e"``: scientific)."""
    return mean_std(values, f".{digits}{spec}")


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: mean ± std over the ok runs, and the run counts."""
    out = []
    for key, g in df.groupby(GROUP_KEYS, sort=False, dropna=False):
        # a seed counts once: of repeated runs of one seed, the last (by folder name) is kept
        g = g.drop_duplicates(subset=["seed"], keep="last") if g.seed.notna().all() else g
        ok = g[g.status == "ok"]
        failed = g[g.status != "ok"]
        row = dict(zip(GROUP_KEYS, key))
        row["runs"] = f"{len(ok)} ok" + (f", {len(failed)} failed" if len(failed) else "")
        row["params"] = int(g.params.iloc[0]) if pd.notna(g.params.iloc[0]) else None
        for col, digits in (("test_error", 2), ("best_test_error", 2), ("nfe_forward", 1),
                            ("nfe_backward", 1), ("activation_mib", 1), ("epoch_time_s", 1),
                            ("iter_s", 3)):
            row[col] = _fmt(ok[col], digits)
        for col in CHECK_FIELDS:
            if col == "valid":
                flags = ok[col].dropna() if col in ok else pd.Series([], dtype=object)
                row[col] = ("-" if flags.empty else
                            f"{int(flags.astype(bool).sum())}/{len(flags)}")
            else:
                row[col] = _fmt(ok[col], 4 if "cosine" in col else 1,
                                "f" if "cosine" in col else "e") if col in ok else "-"
        if "contended" in ok and ok.contended.fillna(False).astype(bool).any():
            # timings taken while the load exceeded the cores: marked, not hidden
            for col in ("epoch_time_s", "iter_s"):
                if row[col] != "-":
                    row[col] += " (contended)"
        row["failures"] = "; ".join(sorted({str(e) for e in failed.error.dropna()})) or ""
        out.append(row)
    return pd.DataFrame(out)


def to_markdown(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True) + "\n"


def write_table(df: pd.DataFrame, stem: Path, header: str = "") -> None:
    """Markdown (with the budget header), CSV and LaTeX versions of one table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    (stem.with_suffix(".md")).write_text((header + "\n\n" if header else "") + to_markdown(df))
    df.to_csv(stem.with_suffix(".csv"), index=False)
    stem.with_suffix(".tex").write_text(df.to_latex(index=False).replace("±", r"$\pm$"))


def budget_line(df: pd.DataFrame) -> str:
    """Budget of a set of runs: epochs and images per model, device, wall time, seeds."""
    parts = []
    for model, g in df.groupby("model", sort=False):
        batch = f", batch {int(g.batch.max())}" if g.batch.notna().any() else ""
        iters = ""
        if "iterations" in g and g.iterations.notna().any():
            iters = f" ({int(g.iterations.max()):,} iterations)"
        sizes = sorted({int(v) for v in g.test_size.dropna()})
        test = (f", test {'/'.join(f'{v:,}' for v in sizes)} img"
                if df.test_size.dropna().nunique() > 1 else "")
        epochs = "?" if g.epochs.isna().all() else int(g.epochs.max())
        train = "?" if g.train_size.isna().all() else f"{int(g.train_size.max()):,}"
        parts.append(f"{MODEL_LABEL.get(model, model)} {epochs} ep x {train} img{batch}{iters}"
                     f"{test}")
    devices = sorted(set(df.device.dropna()))
    wall = df.wall_time_s.fillna(0).sum()
    seeds = sorted({int(s) for s in df.seed.dropna()})
    load = ""
    if "load_start" in df and df.load_start.notna().any():
        loads = pd.concat([df.load_start, df.load_end]).dropna()
        load = (f"; 1-min load average at the runs' starts and ends {loads.min():.2f}-"
                f"{loads.max():.2f}")
        if "contended" in df and df.contended.fillna(False).astype(bool).any():
            load += " (some above the cores: their timings are marked contended)"
    sizes = df.test_size.dropna()
    test = ("" if sizes.empty or sizes.nunique() > 1
            else f"; test images {int(sizes.iloc[0]):,}")
    return (f"Budget: {'; '.join(parts)}{test}; "
            f"device {', '.join(devices)}; training time {wall / 60:.1f} min summed over the "
            f"runs; seeds {', '.join(map(str, seeds))}{load}.")


def table1(df: pd.DataFrame, targets: dict[str, float] | None = None) -> pd.DataFrame:
    """Table 1 of Chen et al. 2018: measured columns, then the paper's.

    ``targets`` (model -> test error %, the profile's targets) adds a ``target %`` column and
    ``met``: whether the last-epoch error of every ok run is at or below it.
    """
    agg = aggregate(df)
    rows = []
    for _, r in agg.iterrows():
        paper = PAPER_TABLE1.get(r.model, {})
        target = {}
        if targets:
            goal = targets.get(r.model)
            ok = df[(df.model == r.model) & (df.status == "ok")
                    & (df.solver_desc == r.solver_desc) & (df.gradient == r.gradient)]
            met = "-" if goal is None or ok.empty else (
                "yes" if bool((ok.test_error <= goal).all()) else "no")
            target = {"target %": "-" if goal is None else f"<= {goal:g}", "met": met}
        rows.append({
            "model": MODEL_LABEL.get(r.model, r.model) + (f" ({r.setting})" if r.setting else ""),
            "solver / gradient": "-" if r.solver_desc == "-" else f"{r.solver_desc}, {r.gradient}",
            "runs": r.runs,
            "batch": "-" if pd.isna(r.batch) else str(int(r.batch)),
            "test error % (last)": r.test_error,
            "test error % (best)": r.best_test_error,
            "params": f"{r.params:,}" if r.params else "-",
            "activation MiB": r.activation_mib,
            "NFE-F": r.nfe_forward if r.solver_desc != "-" else "-",
            "NFE-B": r.nfe_backward if r.solver_desc != "-" else "-",
            "s / epoch": r.epoch_time_s,
            "s / iter": r.iter_s,
            **target,
            # solve checks (issue 13), '-' for models without an ODE block
            "round trip": r.validity_roundtrip_error,
            "ref. error": r.validity_reference_error,
            "valid": r.valid,
            "grad. error init / end": ("-" if r.grad_rel_error_init == "-" else
                                       f"{r.grad_rel_error_init} / {r.grad_rel_error_final}"),
            **{k: paper.get(k, "-") for k in ("paper test error", "paper params",
                                              "paper memory", "paper time")},
        })
    return pd.DataFrame(rows)


def _scalars(run_dir: Path, tags: list[str]) -> dict[str, pd.DataFrame]:
    """Per-iteration scalars from a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    return {t: pd.DataFrame([(e.step, e.value) for e in acc.Scalars(t)], columns=["step", t])
            for t in tags if t in have}


def plot_nfe_training(df: pd.DataFrame, path: Path, window: int = 20) -> pd.DataFrame:
    """Figure 3c/3d: forward and backward NFE over training (moving average), and their ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    stats = []
    for _, r in df[(df.status == "ok") & (df.solver_desc != "-")].iterrows():
        sc = _scalars(Path(r.run), ["train/nfe_forward", "train/nfe_backward"])
        if "train/nfe_forward" not in sc:
            continue
        f = sc["train/nfe_forward"].set_index("step")["train/nfe_forward"]
        bwd = sc["train/nfe_backward"].set_index("step")["train/nfe_backward"]
        label = f"{MODEL_LABEL.get(r.model, r.model)} s{r.seed}"
        a.plot(f.index, f.rolling(window, min_periods=1).mean(), label=f"{label} forward")
        if bwd.sum() > 0:
            a.plot(bwd.index, bwd.rolling(window, min_periods=1).mean(), "--",
                   label=f"{label} backward")
            b.scatter(f, bwd, s=4, alpha=0.4, label=label)
        stats.append({"model": r.model, "seed": int(r.seed), "iterations": len(f),
                      "nfe_forward_first": float(f.iloc[:window].mean()),
                      "nfe_forward_last": float(f.iloc[-window:].mean()),
                      "nfe_backward_first": float(bwd.iloc[:window].mean()),
                      "nfe_backward_last": float(bwd.iloc[-window:].mean()),
                      "ratio_backward_forward": float(bwd.sum() / f.sum()) if f.sum() else math.nan})
    a.set_xlabel("training iteration")
    a.set_ylabel(f"NFE per iteration ({window}-iteration mean)")
    a.set_title("(d) NFE over training")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    a.grid(alpha=0.3)
    lim = b.get_xlim()
    b.plot(lim, [0.5 * lim[0], 0.5 * lim[1]], "k:", label="paper: backward = 0.5 forward")
    b.plot(lim, lim, "k--", lw=0.8, label="backward = forward")
    b.set_xlabel("forward NFE")
    b.set_ylabel("backward NFE (adjoint)")
    b.set_title("(c) backward vs forward NFE")
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return pd.DataFrame(stats)


def _fmt_frame(df: pd.DataFrame, formats: dict[str, str]) -> pd.DataFrame:
    out = df.copy()
    for col, f in formats.items():
        if col in out:
            out[col] = out[col].map(lambda v, f=f: "-" if pd.isna(v) else format(v, f))
    return out


def schedule_line(results: Path) -> str:
    """The reproduction's wall time, schedule and load, from ``results/reproduce.json`` (written
    by ``nodebench reproduce`` when it trained); '' when there is none."""
    path = Path(results) / "reproduce.json"
    if not path.exists():
        return ""
    r = json.loads(path.read_text())
    threads = r.get("threads_per_job")
    how = (f"training sweep {r['sweep_wall_s'] / 60:.1f} min); {r['jobs']} training job(s) "
           "at a time")
    return (f"Reproduction wall time {r['wall_s'] / 60:.1f} min from start to table ({how}"
            f"{f'; {threads} torch thread(s) per job' if threads else ''}; 1-min load average "
            f"{r['load_start']:.2f} at the start, at most {r['load_max']:.2f} during the run, "
            f"{r['load_end']:.2f} at the end, on {r['cores']} cores.")


def _loosest_valid_lines(df: pd.DataFrame, sweep: pd.DataFrame) -> list[str]:
    """Issue 13: for each trained ODE-Net with a validity sweep in its checks.json (`nodebench
    check --tols`), the loosest tolerance at which the round trip and reference checks pass (every
    tighter one passing too) and the sweep's test error there; a table of the sweep's checks."""
    from .checks import loosest_valid

    lines = []
    for _, r in df[(df.model == "odenet") & (df.status == "ok")].iterrows():
        rows = _read_checks(Path(r.run)).get("tolerances")
        if not rows:
            continue
        tol = loosest_valid(rows)
        view = pd.DataFrame(rows)[["tol", "validity_roundtrip_error", "validity_reference_error",
                                   "valid"]]
        at = sweep[sweep.tol == tol] if tol is not None else sweep.iloc[0:0]
        error = (f"; the sweep's test error there {at.test_error_batch.iloc[0]:.2f} % "
                 f"(NFE {at.nfe_forward.iloc[0]:.1f})" if len(at) else "")
        found = (f"the loosest passing tolerance is {tol:g}{error}" if tol is not None else
                 "no tolerance of the sweep passes")
        lines += [(f"Solve validity of the trained ODE-Net (seed {int(r.seed)}) at each tolerance "
                   f"(`nodebench check --tols`, first test images, threshold in README): {found}."),
                  "", to_markdown(_fmt_frame(view, {"tol": "g",
                                                    "validity_roundtrip_error": ".2e",
                                                    "validity_reference_error": ".2e"})), ""]
    return lines


def report_mnist(runs: Path, results: Path, profile: str = "cpu", description: str = "",
                 targets: dict[str, float] | None = None) -> str:
    """Build every Table 1 / Figure 3 output from ``runs`` (and the memory/sweep CSVs and
    ``reproduce.json`` already in ``results``); write them and ``results/README.md``; return the
    README text. ``targets``: the profile's test-error targets (%), shown beside the table."""
    from .memory import slopes

    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    df = collect(runs)
    if df.empty:
        raise SystemExit(f"no runs with summary.json under {runs}")
    budget = budget_line(df)
    schedule = schedule_line(results)
    budget = f"{budget} {schedule}" if schedule else budget
    quiet = quiet_verdict(results)   # the machine's verdict when run under shared/tools/quiet-run
    budget = f"{budget} Machine: `{quiet}`" if quiet else budget
    t1 = table1(df, targets)
    write_table(t1, results / "table1", f"Table 1 (Chen et al. 2018), MNIST. {budget}")
    df.drop(columns=["run"]).to_csv(results / "runs.csv", index=False)
    lines = [f"# MNIST: Table 1 and Figure 3 of Chen et al. 2018 (profile `{profile}`)", "",
             ("Generated by `nodebench reproduce chen2018_table1 profile="
              f"{profile}` (`make reproduce-mnist PROFILE={profile}`) from the run directories in "
              f"`{shown_path(runs)}`; do not edit by hand."),
             "", f"Profile: {description}.", "", "## Table 1", "", budget, "", to_markdown(t1),
             ("Measured columns come from this run; `paper` columns are Chen et al. 2018's. "
              "Test error: last epoch and best epoch (the reference script keeps the best). "
              "Activation MiB: the largest number of bytes autograd keeps for backward at the end "
              "of one training step's forward pass (parameters excluded, each storage once). "
              "NFE: mean per training iteration over the last epoch (forward solve; backward = "
              "adjoint solve). `target %` and `met`: the profile's target for the last-epoch "
              "error. The control row is the Table-1 network without its ODE block (stem + "
              "head), trained with the same budget: the difference to it is what the block "
              "adds. Solve checks of the trained model on the first test images (the trainer's "
              "last epoch, or `nodebench check` from model.pt): `round trip`, the relative error "
              "of integrating y(t1) back to t0 with the run's solver; `ref. error`, the relative "
              "error of y(t1) against a float64 dopri5 1e-8 solve; `valid`, runs where both are "
              "below the threshold (README: solve validity); `grad. error`, the relative error "
              "of the run's parameter gradient against float64 dopri5 1e-9 direct backprop, at "
              "initialisation and at the end."), ""]
    mem_csv = results / "memory_data.csv"
    if mem_csv.exists():
        mem = pd.read_csv(mem_csv)
        s = slopes(mem)
        view = _fmt_frame(mem[["model", "gradient", "setting", "nfe_forward", "nfe_backward",
                               "activation_mib"]], {"activation_mib": ".1f"})
        write_table(view, results / "memory", f"Memory scaling, batch {int(mem.batch.iloc[0])}, "
                    f"{mem.dataset.iloc[0]}, at initialisation.")
        lines += ["## Memory scaling (the memory column, measured)", "",
                  f"One training step at initialisation, batch {int(mem.batch.iloc[0])}. "
                  "Least-squares slopes: "
                  + ", ".join(f"{MODEL_LABEL[k]} {v:.2f} MiB per "
                              f"{'block' if k == 'resnet' else 'forward NFE'}"
                              for k, v in s.items()) + ".", "", to_markdown(view),
                  "![memory scaling](memory.png)", ""]
    nfe_stats = plot_nfe_training(df, results / "fig3cd.png")
    if not nfe_stats.empty:
        view = _fmt_frame(nfe_stats, {c: ".2f" for c in nfe_stats.columns
                                      if c.startswith(("nfe_", "ratio_"))})
        write_table(view, results / "nfe_training")
        adjoint = nfe_stats[nfe_stats.nfe_backward_last > 0]
        measured = ("; measured here over the whole training run: " + ", ".join(
            f"{MODEL_LABEL.get(m, m)} s{sd} {v:.2f}" for m, sd, v in
            zip(adjoint.model, adjoint.seed, adjoint.ratio_backward_forward))) \
            if not adjoint.empty else ""
        lines += ["## Figure 3c/3d: NFE over training", "",
                  ("Means over the first and the last 20 iterations. Backward / forward NFE of "
                   "the adjoint: Chen et al. 2018 (Fig. 3c) state \"roughly half\" (0.5), counted "
                   "with scipy's LSODA according to torchdiffeq's maintainer "
                   "(rtqichen/torchdiffeq#97); the ANODE replication VanniLeonardo/"
                   "re-augmented-neural-odes gives 0.78-0.86 (its README)" + measured +
                   " (`ratio_backward_forward`, total backward over total forward NFE)."), "",
                  to_markdown(view), "![NFE over training](fig3cd.png)", ""]
    sweep_csv = results / "sweep_data.csv"
    if sweep_csv.exists():
        sw = pd.read_csv(sweep_csv)
        view = _fmt_frame(sw[["tol", "nfe_forward", "nfe_backward", "ratio_backward_forward",
                              "error_mean", "error_max", "forward_time_s", "test_error_batch"]],
                          {"tol": "g", "ratio_backward_forward": ".2f", "error_mean": ".2e",
                           "error_max": ".2e", "forward_time_s": ".3f",
                           "test_error_batch": ".2f"})
        write_table(view, results / "sweep", f"Tolerance sweep of the trained ODE-Net on "
                    f"{int(sw.batch.iloc[0])} test images.")
        lines += ["## Figure 3a/3b: tolerance sweep of the trained ODE-Net", "",
                  (f"{int(sw.batch.iloc[0])} test images; error against a dopri5 solution at "
                   "rtol = atol = 1e-8; forward time of the ODE block alone (best of 3)."), "",
                  to_markdown(view), "![tolerance sweep](fig3ab.png)", ""]
        lines += _loosest_valid_lines(df, sw)
    failed = df[df.status != "ok"]
    if len(failed):
        lines += ["## Failed runs", "", to_markdown(failed[["model", "seed", "error"]])]
    text = "\n".join(lines).rstrip() + "\n"
    (results / "README.md").write_text(text)
    return text


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nodebench report",
                                description="Comparison tables from run directories.")
    p.add_argument("runs", nargs="+", help="folders searched recursively for summary.json")
    p.add_argument("--out", default=None, help="write table.{md,csv,tex} and runs.csv here")
    a = p.parse_args(argv)
    df = collect([Path(r) for r in a.runs])
    if df.empty:
        from .errors import ConfigError
        raise ConfigError(f"no summary.json found under {', '.join(a.runs)}")
    agg = aggregate(df)
    print(budget_line(df))
    print(to_markdown(agg))
    if a.out:
        write_table(agg, Path(a.out) / "table", budget_line(df))
        df.drop(columns=["run"]).to_csv(Path(a.out) / "runs.csv", index=False)
        print(f"written to {a.out}/table.md, table.csv, table.tex, runs.csv")
    return 0
