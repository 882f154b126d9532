"""The report of ``nodebench reproduce finlay2020_regularisation`` and
``finlay2020_regularisation_cnf`` (``make reproduce-regularisation``): RNODE (Finlay et al. 2020)
and TayNODE (Kelly et al. 2020) penalties on the Table-1 ODE-Net on MNIST (score: test error) and
on the planar CNF of Chen et al. 2018 trained by maximum likelihood (score: test NLL), compared
with the plain model in NFE *and* in seconds (docs/reference.md section 7: "NFE is misleading"
when each evaluation costs more).

The runs are ordinary ``nodebench train`` runs (``model.penalties``; presets
``conf/experiment/finlay2020_regularisation*.yaml``, settings ``conf/penalties/``). :func:`report`
reads only their run records (summary.json, metrics.csv) and writes, into the results folder:
``regularisation.md`` / ``regularisation.csv`` (one row per penalty setting, mean ± std over the
seeds), ``regularisation_runs.csv`` (one row per run), ``error_vs_time.png``,
``error_vs_test_nfe.png`` and ``README.md`` (budget, the papers' claims, and whether the savings
hold in time, a sentence computed from the numbers).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..tables import mean_std, quiet_verdict, save_figure

WEIGHTS = ("kinetic", "frobenius", "taylor")
CLAIMS = [
    ("RNODE (Finlay et al. 2020, \"How to train your neural ODE\"): the kinetic-energy and "
    "Jacobian-Frobenius penalties reduce NFE; on MNIST density estimation 0.97 bits/dim and about "
    "2.8x faster training than FFJORD (secondary sources; docs/reference.md section 7)."),
    ("TayNODE (Kelly et al. 2020, \"Learning differential equations that are easy to solve\"): "
    "penalising the K-th total time derivative gives training NFE up, test NFE down "
    "(easy-neural-ode#5); \"NFE is misleading\" when each evaluation costs more "
    "(RegNeuralDE.jl#22): compare by wall time too."),
]


def setting_name(penalties: dict | None) -> str:
    """A label of a ``model.penalties`` node: ``none``, ``RNODE (kinetic 2.17e-06, frobenius
    4.34e-06)``, ``TayNODE K=2 (1e-05)``, or the weights for other mixes."""
    p = penalties or {}
    w = {k: float(p.get(k) or 0.0) for k in WEIGHTS}
    if not any(w.values()):
        return "none"
    parts = [f"{k} {v:.3g}" for k, v in w.items() if v > 0 and k != "taylor"]
    if w["taylor"] > 0:
        taylor = f"TayNODE K={p.get('order', 2)} ({w['taylor']:.3g})"
        return taylor if not parts else f"{taylor} + {', '.join(parts)}"
    prefix = "RNODE" if w["kinetic"] > 0 and w["frobenius"] > 0 else "penalty"
    return f"{prefix} ({', '.join(parts)})"


def _last_row(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows[-1] if rows else {}


def _num(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def collect(runs: Path) -> list[dict]:
    """One dict per run record under ``runs``: setting, seed, status and the report's numbers."""
    out = []
    for path in sorted(Path(runs).rglob("summary.json")):
        s = json.loads(path.read_text())
        model = (s.get("config") or {}).get("model") or {}
        last = _last_row(path.parent / "metrics.csv")
        valid = s.get("valid")
        out.append({
            "setting": setting_name(model.get("penalties")), "seed": s.get("seed"),
            "status": s.get("status"), "error": s.get("error"),
            "experiment": s.get("experiment"), "task": s.get("task"),
            "dataset": s.get("dataset"), "config_model": model.get("name"),
            "test_error": _num(s.get("test_error")), "test_nll": _num(s.get("test_nll")),
            "nfe_forward": _num(s.get("nfe_forward")), "nfe_backward": _num(s.get("nfe_backward")),
            "nfe_eval": _num(s.get("nfe_eval")), "iter_s": _num(s.get("iter_s")),
            "eval_time_s": _num(last.get("eval_time_s")),
            "wall_time_s": _num(s.get("wall_time_s")),
            **{f"penalty_{k}": _num(s.get(f"penalty_{k}")) for k in WEIGHTS},
            "validity_reference_error": _num(s.get("validity_reference_error")),
            "validity_roundtrip_error": _num(s.get("validity_roundtrip_error")),
            "valid": None if valid is None else bool(valid),
            "iterations": s.get("iterations"), "train_size": s.get("train_size"),
            "test_size": s.get("test_size"), "device": s.get("device"),
            "threads": s.get("threads"), "load_start": s.get("load_start"),
            "load_end": s.get("load_end"), "contended": s.get("contended"),
            "run": str(path.parent.relative_to(runs)),
        })
    return out


# The score each task is judged on: (record key, column title, axis label, format).
SCORES = {"classification": ("test_error", "test error %", "test error (%)", ".2f"),
          "maximum_likelihood": ("test_nll", "test NLL (nats)", "test NLL (nats per point)",
                                 ".3f")}
# A ratio to the baseline within 2 % counts as no change (run-to-run noise of the adaptive step
# counts and timings).
NO_CHANGE = 0.98


def score_of(records: list[dict]) -> tuple[str, str, str, str]:
    """(key, column title, axis label, format) of the records' score: test error for the classifiers,
    test negative log-likelihood for the flows trained by maximum likelihood."""
    tasks = {r.get("task") for r in records}
    for task, score in SCORES.items():
        if task in tasks:
            return score
    return SCORES["classification"]


# (column title, record key, format), after the score of :func:`score_of`
COLUMNS = [("NFE forward / iter", "nfe_forward", ".1f"),
           ("NFE backward / iter", "nfe_backward", ".1f"), ("test NFE", "nfe_eval", ".1f"),
           ("s / train iter", "iter_s", ".3g"), ("eval s", "eval_time_s", ".3g"),
           ("wall time s", "wall_time_s", ".4g"),
           ("penalty kinetic", "penalty_kinetic", ".3g"),
           ("penalty frobenius", "penalty_frobenius", ".3g"),
           ("penalty taylor", "penalty_taylor", ".3g"),
           ("validity ref. error", "validity_reference_error", ".2e"),
           ("round-trip error", "validity_roundtrip_error", ".2e")]


def subject_of(records: list[dict]) -> str:
    """What the penalties were put on, for titles: the Table-1 ODE-Net on MNIST or the CNF."""
    models = {(r.get("config_model"), r.get("dataset")) for r in records}
    names = sorted({m for m, _ in models if m})
    data = sorted({d for _, d in models if d})
    if names == ["odenet"]:
        return f"the Table-1 ODE-Net ({', '.join(data)})"
    if names == ["cnf"]:
        return f"the planar CNF ({', '.join(data)}, maximum likelihood)"
    return f"{', '.join(names) or 'the model'} ({', '.join(data)})"


def _settings(records: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r["setting"] not in seen:
            seen.append(r["setting"])
    return sorted(seen, key=lambda s: (s != "none", seen.index(s)))


def columns(records: list[dict]) -> list[tuple[str, str, str]]:
    """The table's columns for these records: the score of their task first (:func:`score_of`)."""
    key, title, _, fmt = score_of(records)
    return [(title, key, fmt), *COLUMNS]


def table(records: list[dict]) -> list[dict]:
    """One row per setting: runs, mean ± std over the ok runs (tables.mean_std), valid count."""
    rows = []
    for setting in _settings(records):
        group = [r for r in records if r["setting"] == setting]
        ok = [r for r in group if r["status"] == "ok"]
        row = {"setting": setting, "runs": f"{len(ok)} ok" + (
            f", {len(group) - len(ok)} failed" if len(group) > len(ok) else "")}
        for title, key, fmt in columns(records):
            row[title] = mean_std([r[key] for r in ok], fmt, single="{mean} (1 seed)")
        flags = [r["valid"] for r in ok if r["valid"] is not None]
        row["valid"] = f"{sum(flags)}/{len(flags)}" if flags else "-"
        rows.append(row)
    return rows


def _mean(records: list[dict], key: str) -> float | None:
    vals = [r[key] for r in records if r["status"] == "ok" and r[key] is not None]
    return sum(vals) / len(vals) if vals else None


def verdicts(records: list[dict]) -> list[str]:
    """For every penalised setting, a sentence from the numbers: its training NFE, test NFE and
    seconds (per training iteration, evaluation, wall time) relative to ``none``, and whether the
    NFE savings hold in time."""
    base = [r for r in records if r["setting"] == "none"]
    if not base or _mean(base, "iter_s") is None:
        return ["No ok baseline run (setting none): the savings cannot be judged."]
    out = []
    for setting in _settings(records):
        if setting == "none":
            continue
        group = [r for r in records if r["setting"] == setting]

        def ratio(key: str, g=group) -> float | None:
            a, b = _mean(g, key), _mean(base, key)
            return a / b if a is not None and b else None

        # training NFE per iteration: forward + backward (adjoint) evaluations
        parts = [_mean(g, k) for g in (group, base) for k in ("nfe_forward", "nfe_backward")]
        r_train = None if None in parts or not parts[2] + parts[3] else (
            (parts[0] + parts[1]) / (parts[2] + parts[3]))
        r_test, r_iter = ratio("nfe_eval"), ratio("iter_s")
        r_eval, r_wall = ratio("eval_time_s"), ratio("wall_time_s")
        if r_train is None or r_iter is None:
            out.append(f"{setting}: no ok run with NFE and timings to compare.")
            continue

        def x(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.2f}x"

        facts = (f"training NFE per iteration {x(r_train)}, seconds per training iteration "
                 f"{x(r_iter)}, test NFE {x(r_test)}, evaluation seconds {x(r_eval)}, wall time "
                 f"{x(r_wall)} of the baseline's")
        if r_train < NO_CHANGE and r_iter < 1:
            train = "the training NFE saving holds in time"
        elif r_train < NO_CHANGE:
            train = ("the training NFE saving does not hold in time (each iteration costs more "
                     "seconds: the penalty's own derivatives)")
        elif r_iter < 1:
            train = "no training NFE saving, yet fewer seconds per training iteration"
        else:
            train = "neither fewer training NFE nor fewer seconds per training iteration"
        if r_test is None:
            test = "no test NFE to compare"
        elif r_test < NO_CHANGE and (r_eval is not None and r_eval < NO_CHANGE):
            test = "the test NFE saving holds in evaluation time"
        elif r_test < NO_CHANGE:
            test = "the test NFE saving does not show in evaluation time"
        else:
            test = "no test NFE saving"
        out.append(f"{setting}: {facts}; {train}; {test}.")
    return out


def _markdown(rows: list[dict]) -> list[str]:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return lines


def _budget(records: list[dict], profile: str, results: Path | None = None) -> str:
    ok = [r for r in records if r["status"] == "ok"] or records
    first = ok[0]
    seeds = sorted({r["seed"] for r in records if r["seed"] is not None})
    walls = [r["wall_time_s"] for r in records if r["wall_time_s"] is not None]
    loads = [f"{r['load_start'][0]:.2f}->{r['load_end'][0]:.2f}" for r in records
             if r.get("load_start") and r.get("load_end")]
    contended = sum(1 for r in records if r.get("contended"))
    key, title, _, _ = score_of(records)
    kind = "images" if key == "test_error" else "points"
    quiet = quiet_verdict(results) if results is not None else None
    return (f"Budget (profile `{profile}`): {first['iterations']} training iterations per run on "
            f"{first['train_size']} training {kind} ({first['dataset']}), {title.split(' (')[0]} "
            f"on {first['test_size']} test {kind}; seeds {', '.join(str(s) for s in seeds)}; {len(records)} runs on "
            f"{first['device']}, {first['threads']} thread(s) each; wall time "
            f"{sum(walls):.1f} s summed over runs; 1-minute load start->end per run: "
            f"{', '.join(loads) or 'n/a'}"
            + (f" ({contended} run(s) contended: timings taken while something else computed)"
               if contended else "") + "."
            + (f" Machine: `{quiet}`" if quiet else ""))


def _figures(records: list[dict], results: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    settings = _settings(records)
    colours = {s: f"C{i}" for i, s in enumerate(settings)}
    score, _, score_label, _ = score_of(records)
    for name, key, label in (("error_vs_time.png", "wall_time_s", "wall time per run (s)"),
                             ("error_vs_test_nfe.png", "nfe_eval", "test NFE per batch")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for setting in settings:
            pts = [(r[key], r[score]) for r in records if r["setting"] == setting
                   and r["status"] == "ok" and r[key] is not None and r[score] is not None]
            if pts:
                ax.scatter(*zip(*pts), color=colours[setting], label=setting)
        ax.set_xlabel(label)
        ax.set_ylabel(score_label)
        ax.set_title(f"{score_label.split(' (')[0].capitalize()} vs {label.split(' per')[0]}, one point per run")
        made.append(save_figure(fig, ax, results / name))
    return made


def report(runs: Path, results: Path, profile: str) -> bool:
    """Write the regularisation report from the run records under ``runs`` into ``results``.
    Returns False (writing nothing) when there is no run record."""
    runs, results = Path(runs), Path(results)
    records = collect(runs)
    if not records:
        return False
    results.mkdir(parents=True, exist_ok=True)
    rows = table(records)
    with open(results / "regularisation.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    keys = ["setting", "seed", "status", "error", *(k for _, k, _ in columns(records)), "valid",
            "run"]
    with open(results / "regularisation_runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    budget = _budget(records, profile, results)
    subject = subject_of(records)
    md = [f"# RNODE and TayNODE penalties on {subject}", "", budget, "",
          ("Mean ± sample std over the seeds (ok runs). NFE per training iteration (forward "
          "solve; the adjoint's backward solve) and per test batch; seconds per training "
          "iteration include the penalties' own cost (their vector-Jacobian products are not "
          "function evaluations). Penalties: batch means of the integrated values, last epoch. "
          "Validity: reference and round-trip errors of the plain solve of a fixed batch at the "
          "end of training; valid = runs under the threshold."), "",
          *_markdown(rows), ""]
    (results / "regularisation.md").write_text("\n".join(md))
    figures = _figures(records, results)
    preset = next((str(r["experiment"]).rsplit("-", 1)[0] for r in records if r["experiment"]),
                  "finlay2020_regularisation")
    readme = [f"# Regularisers (RNODE, TayNODE) on {subject}: do the NFE savings hold in time?",
              "", (f"Made by `nodebench reproduce {preset}` (`make "
              "reproduce-regularisation`) from the run records alone; the table is "
              "`regularisation.md` (`regularisation.csv`; one row per run in "
              "`regularisation_runs.csv`)."), "", budget, "", "## The papers' claims", "",
              *[f"- {c}" for c in CLAIMS], "", "## What these runs say", "",
              *[f"- {v}" for v in verdicts(records)], "", "## Table", "", *_markdown(rows), "",
              "## Figures", "", *[f"![{f}]({f})" for f in figures], ""]
    (results / "README.md").write_text("\n".join(readme))
    return True
