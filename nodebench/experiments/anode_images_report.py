"""The report of ``nodebench reproduce dupont2019_images``: NODE vs ANODE image classifiers of
Dupont, Doucet, Teh 2019 (section 5, Table 1 of that paper: MNIST 96.4 ± 0.5 vs 98.2 ± 0.1 %
test accuracy, 5 runs, parameter-matched) at a wall-time budget.

The runs are ordinary ``nodebench train`` runs (models ``node_conv`` and ``anode_conv``; preset
``conf/experiment/dupont2019_images.yaml``; the arms ``conf/arm/`` give each model its epochs).
:func:`report` reads only their run records (summary.json, metrics.csv) and writes into the
results folder:

- ``images.md`` / ``images.csv``: one row per model, mean ± std over the seeds: final test
  accuracy, accuracy at equal epochs (the last epoch both arms reached) and at equal wall time
  (per seed: the last evaluation of each run at or before the end of that seed's shortest run,
  so the shorter arm is read at its own end), NFE per iteration (at each run's end, at equal
  epochs and at equal wall time), seconds per iteration, wall time, runs whose final solve check
  passed (summary.json ``valid``: reference and round-trip errors under the threshold); the
  paper's accuracy in a column of its own.
- ``images_runs.csv``: one row per run; ``images_curves.csv``: accuracy after every epoch with
  the cumulative training + evaluation seconds.
- ``accuracy_vs_time.png`` and ``accuracy_vs_epoch.png``; ``README.md`` with the budget, the
  load and quiet-run verdict, the paper's and the replication's numbers and a verdict on each
  target of the issue computed from the numbers.

Wall time here is the sum of the runs' epoch and evaluation seconds (metrics.csv
``epoch_time_s`` + ``eval_time_s``), not counting the solve-validity checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..tables import max_load, mean_std, quiet_verdict, save_figure

TITLES = {"node_conv": "NODE", "anode_conv": "ANODE"}
PAPER = {"node_conv": "96.4 ± 0.5", "anode_conv": "98.2 ± 0.1"}
CLAIMS = [
    ("Dupont et al. 2019 (Table 1, MNIST, 5 runs, parameter-matched): NODE 96.4 ± 0.5 %, ANODE "
     "98.2 ± 0.1 % test accuracy; ANODE also needs fewer NFE and its NFE grow less in training."),
    ("Independent replication (docs/reference.md section 5): NODE 94.16 ± 0.44 %, ANODE "
     "98.05 ± 0.20 %, ANODE with 1.9-2.1x fewer NFE."),
]


def _runs(runs: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per run, one row per evaluated epoch of every run) from the run records."""
    rows, curves = [], []
    for path in sorted(Path(runs).rglob("summary.json")):
        s = json.loads(path.read_text())
        model = s.get("model")
        if model not in TITLES:
            continue
        cfg = s.get("config") or {}
        rows.append({"model": model, "seed": s.get("seed"), "status": s.get("status"),
                     "error": s.get("error"), "params": s.get("params"),
                     "epochs": s.get("epochs_done"), "iterations": s.get("iterations"),
                     "test_accuracy": (None if s.get("test_error") is None
                                       else 100.0 - float(s["test_error"])),
                     **{k: s.get(k) for k in ("nfe_forward", "nfe_backward", "nfe_eval",
                                              "iter_s", "wall_time_s", "valid", "device",
                                              "threads", "load_start", "load_end",
                                              "train_size", "test_size", "solver_desc",
                                              "gradient")},
                     "batch": (cfg.get("trainer") or {}).get("batch_size"),
                     "max_batches": (cfg.get("trainer") or {}).get("max_batches"),
                     "optim": (cfg.get("optim") or {}).get("name"),
                     "cycles": _cycles(cfg),
                     "run": str(path.parent.relative_to(runs))})
        metrics = path.parent / "metrics.csv"
        if metrics.exists():
            m = pd.read_csv(metrics)
            elapsed = (m["epoch_time_s"].fillna(0) + m["eval_time_s"].fillna(0)).cumsum()
            for (_, r), t in zip(m.iterrows(), elapsed):
                if pd.notna(r.get("test_error")):
                    curves.append({"model": model, "seed": s.get("seed"), "epoch": int(r["epoch"]),
                                   "elapsed_s": float(t), "iterations": r.get("iterations"),
                                   "test_accuracy": 100.0 - float(r["test_error"]),
                                   "nfe_forward": r.get("nfe_forward"),
                                   "nfe_backward": r.get("nfe_backward")})
    return pd.DataFrame(rows), pd.DataFrame(curves)


def _cycles(cfg: dict) -> str | None:
    """'6 + 5 epochs, peaks 0.003 / 0.0015' for a run of optim ``adam_onecycle_restarts``."""
    optim = cfg.get("optim") or {}
    sched = optim.get("scheduler") or {}
    cycles, peaks = sched.get("cycles"), sched.get("peaks")
    epochs = (cfg.get("trainer") or {}).get("epochs")
    lr = (optim.get("optimizer") or {}).get("lr")
    if not cycles or not peaks or not epochs or lr is None:
        return None
    lengths = [epochs * c / sum(cycles) for c in cycles]
    return (" + ".join(f"{x:.3g}" for x in lengths) + " epochs, peak rates "
            + " / ".join(f"{lr * q:g}" for q in peaks))


def _epoch_at(curves: pd.DataFrame, model: str, seed, seconds: float) -> int | None:
    """The epoch of a run's last evaluation at or before ``seconds``."""
    c = curves[(curves.model == model) & (curves.seed == seed) & (curves.elapsed_s <= seconds + 1e-9)]
    return None if c.empty else int(c.iloc[-1]["epoch"])


def _at(curves: pd.DataFrame, model: str, seed, *, epoch=None, seconds=None,
        column: str = "test_accuracy") -> float | None:
    """A run's ``column`` of ``curves`` (e.g. ``test_accuracy`` in %, or ``nfe``, see
    :func:`table`) at its last evaluation at or before ``epoch`` / ``seconds``; None where
    there is none or the value is missing."""
    c = curves[(curves.model == model) & (curves.seed == seed)]
    c = c[c.epoch <= epoch] if epoch is not None else c[c.elapsed_s <= seconds + 1e-9]
    value = None if c.empty else c.iloc[-1][column]
    return None if value is None or pd.isna(value) else float(value)


def table(frame: pd.DataFrame, curves: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """One row per model (mean ± std over the ok runs) and the numbers the verdicts use."""
    ok = frame[frame.status == "ok"]
    # forward + backward NFE per training iteration, the epoch's mean (backward missing: 0)
    curves = curves.assign(nfe=pd.to_numeric(curves.nfe_forward, errors="coerce")
                           + pd.to_numeric(curves.nfe_backward, errors="coerce").fillna(0.0))
    ends = curves.groupby(["model", "seed"]).agg(epochs=("epoch", "max"), end=("elapsed_s", "max"))
    common_epoch = int(ends.epochs.min()) if len(ends) else None
    # equal wall time, per seed: the end of that seed's shortest run (so that every run of the
    # shorter arm is read at its own end, annealed, and never before it)
    seed_time = ends.groupby(level="seed").end.min().to_dict() if len(ends) else {}
    common_time = max(seed_time.values()) if seed_time else None
    rows, facts = [], {"common_epoch": common_epoch, "common_time": common_time,
                       "seed_time": seed_time}
    for model in [m for m in TITLES if m in set(frame.model)]:
        g = ok[ok.model == model]
        at_epoch = [_at(curves, model, s, epoch=common_epoch) for s in g.seed]
        at_time = [_at(curves, model, s, seconds=seed_time[s]) if s in seed_time else None
                   for s in g.seed]
        nfe_epoch = [_at(curves, model, s, epoch=common_epoch, column="nfe") for s in g.seed]
        nfe_time = [_at(curves, model, s, seconds=seed_time[s], column="nfe")
                    if s in seed_time else None for s in g.seed]
        facts.setdefault("time_epochs", {})[model] = sorted(
            {e for e in (_epoch_at(curves, model, s, seed_time[s]) for s in g.seed
                         if s in seed_time) if e is not None})
        facts[model] = {k: (pd.to_numeric(pd.Series(v), errors="coerce").mean() if len(v) else None)
                        for k, v in (("final", list(g.test_accuracy)), ("at_epoch", at_epoch),
                                     ("at_time", at_time), ("iter_s", list(g.iter_s)),
                                     ("nfe", list(g.nfe_forward + g.nfe_backward)),
                                     ("nfe_epoch", nfe_epoch), ("nfe_time", nfe_time))}
        rows.append({
            "model": TITLES[model], "params": mean_std(g.params, ".0f", single="{mean}"),
            "runs": f"{len(g)} ok" + (f", {(frame.model == model).sum() - len(g)} failed"
                                      if (frame.model == model).sum() > len(g) else ""),
            "epochs": mean_std(g.epochs, ".0f", single="{mean}"),
            "iterations": mean_std(g.iterations, ".0f", single="{mean}"),
            "test acc. % (final)": mean_std(g.test_accuracy, ".2f"),
            f"test acc. % at epoch {common_epoch}": mean_std(at_epoch, ".2f"),
            "test acc. % at equal wall time": mean_std(at_time, ".2f"),
            "NFE forward / iter": mean_std(g.nfe_forward, ".1f"),
            f"NFE / iter at epoch {common_epoch}": mean_std(nfe_epoch, ".1f"),
            "NFE / iter at equal wall time": mean_std(nfe_time, ".1f"),
            "NFE backward / iter": mean_std(g.nfe_backward, ".1f"),
            "test NFE": mean_std(g.nfe_eval, ".1f"),
            "s / iter": mean_std(g.iter_s, ".3f"),
            "wall time s": mean_std(g.wall_time_s, ".0f"),
            "solve valid": (f"{int(g.valid.fillna(False).astype(bool).sum())}/{len(g)}"
                            if g.valid.notna().any() else "-"),
            "paper acc. % (5 runs, full budget)": PAPER[model],
        })
    return pd.DataFrame(rows), facts


def verdicts(facts: dict) -> list[str]:
    """Sentences on the targets (ANODE >= 94 %, >= 1.0 point above NODE at equal wall time, fewer
    NFE, less time per iteration), computed from the numbers."""
    a, n = facts.get("anode_conv"), facts.get("node_conv")
    if not a or not n or a["final"] is None or n["final"] is None:
        return ["Both NODE and ANODE need an ok run for the comparison."]

    def yes(flag: bool) -> str:
        return "holds" if flag else "does not hold"

    out = [(f"ANODE's final test accuracy is {a['final']:.2f} % (target at least 94 %: "
            f"{yes(a['final'] >= 94)}); NODE's {n['final']:.2f} %.")]
    if a["at_time"] is not None and n["at_time"] is not None:
        gap = a["at_time"] - n["at_time"]
        epochs = facts.get("time_epochs") or {}
        which = "; ".join(f"{TITLES[m]} after epoch {', '.join(str(e) for e in epochs[m])}"
                          for m in ("anode_conv", "node_conv") if epochs.get(m))
        times = ", ".join(f"{t:.0f} s" for _, t in sorted(facts["seed_time"].items()))
        out.append(f"At equal wall time (per seed, the end of its shorter run: {times}) "
                   f"ANODE {a['at_time']:.2f} % vs NODE {n['at_time']:.2f} %: {gap:+.2f} points "
                   f"(target at least +1.0: {yes(gap >= 1.0)})"
                   + (f"; the evaluations compared: {which}." if which else "."))
    if a["at_epoch"] is not None and n["at_epoch"] is not None:
        out.append(f"At equal epochs ({facts['common_epoch']}) ANODE {a['at_epoch']:.2f} % vs NODE "
                   f"{n['at_epoch']:.2f} % ({a['at_epoch'] - n['at_epoch']:+.2f} points).")

    def fewer(key: str) -> str:
        return (f"ANODE {a[key]:.1f} vs NODE {n[key]:.1f} ({n[key] / a[key]:.2f}x fewer for "
                f"ANODE: {yes(a[key] < n[key])})")

    def known(key: str) -> bool:
        return bool(a[key]) and bool(n[key]) and pd.notna(a[key]) and pd.notna(n[key])

    if known("nfe_time"):
        out.append("NFE per training iteration (forward + backward, the mean over the epoch of the "
                   f"evaluation compared) at equal wall time: {fewer('nfe_time')}"
                   + (f"; at equal epochs ({facts['common_epoch']}): {fewer('nfe_epoch')}"
                      if known("nfe_epoch") else "") + ".")
    if a["nfe"] and n["nfe"]:
        out.append(f"NFE per training iteration at each run's end (its last epoch; the arms' "
                   f"epochs differ): {fewer('nfe')}; seconds per iteration ANODE "
                   f"{a['iter_s']:.3f} vs NODE {n['iter_s']:.3f} ({yes(a['iter_s'] < n['iter_s'])} "
                   f"that ANODE costs less time).")
    return out


def _figures(curves: pd.DataFrame, results: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    colours = {"node_conv": "tab:red", "anode_conv": "tab:blue"}
    for name, x, label in (("accuracy_vs_time.png", "elapsed_s", "wall time (s, training + test)"),
                           ("accuracy_vs_epoch.png", "epoch", "epoch")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (model, seed), c in curves.groupby(["model", "seed"]):
            ax.plot(c[x], c["test_accuracy"], marker="o", color=colours.get(model),
                    label=f"{TITLES.get(model, model)} seed {seed}",
                    linestyle="-" if seed == 0 else "--")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"MNIST test accuracy against {label.split(' (')[0]}")
        made.append(save_figure(fig, ax, results / name))
    return made


def _budget(frame: pd.DataFrame, profile: str, results: Path) -> str:
    parts = []
    for model, g in frame.groupby("model", sort=False):
        r = g.iloc[0]
        cycles = r.get("cycles")
        parts.append(f"{TITLES.get(model, model)} {r['epochs']} epochs = {r['iterations']} "
                     f"iterations of {r['batch']} images"
                     + (f" (learning-rate cycles of {cycles})" if isinstance(cycles, str) else ""))
    r = frame.iloc[0]
    seeds = ", ".join(str(s) for s in sorted(frame.seed.unique()))
    text = (f"Budget (profile `{profile}`): {'; '.join(parts)} (an epoch: at most "
            f"{r['max_batches']} batches drawn from {r['train_size']} training images), "
            f"{r['optim']}, {r['solver_desc']}, {r['gradient']} gradients; test accuracy on "
            f"{r['test_size']} test images after every epoch; seeds {seeds}; {r['device']}, "
            f"{r['threads']} thread(s) per run, two runs at a time; {len(frame)} runs, "
            f"wall time {frame.wall_time_s.sum():.0f} s summed over runs; 1-min load at the "
            f"runs' start/end at most {max_load(frame):.2f}.")
    quiet = quiet_verdict(results)
    return text + (f" Machine: `{quiet}`" if quiet else "")


def report(runs: Path, results: Path, profile: str) -> bool:
    """Write the NODE vs ANODE image report from the run records under ``runs`` into
    ``results``. Returns False (writing nothing) when there is no NODE/ANODE run record."""
    runs, results = Path(runs), Path(results)
    frame, curves = _runs(runs)
    if frame.empty:
        return False
    results.mkdir(parents=True, exist_ok=True)
    rows, facts = table(frame, curves)
    rows.to_csv(results / "images.csv", index=False)
    frame.drop(columns=["load_start", "load_end"]).to_csv(results / "images_runs.csv", index=False)
    curves.to_csv(results / "images_curves.csv", index=False)
    budget = _budget(frame, profile, results)
    md = rows.to_markdown(index=False, disable_numparse=True)
    (results / "images.md").write_text(
        f"# NODE vs ANODE on MNIST (Dupont et al. 2019 section 5)\n\n{budget}\n\n{md}\n")
    figures = _figures(curves, results) if not curves.empty else []
    readme = ["# Augmented Neural ODEs on MNIST at a CPU budget: NODE vs ANODE", "",
              ("Made by `nodebench reproduce dupont2019_images` from the run records alone; "
               "table `images.md` (`images.csv`; per run `images_runs.csv`; accuracy after "
               "every epoch `images_curves.csv`)."), "", budget, "", "## The paper's claims", "",
              *[f"- {c}" for c in CLAIMS], "", "## What these runs say", "",
              *[f"- {v}" for v in verdicts(facts)], "", "## Table", "", md, "",
              "## Figures", "", *[f"![{f}]({f})" for f in figures], ""]
    (results / "README.md").write_text("\n".join(readme))
    return True
