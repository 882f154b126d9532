"""The reports of ``make reproduce-cnf``: continuous normalizing flows against planar normalizing
flows, Chen et al. 2018 section 4.1 (Figure 4, density matching; Figure 5, maximum likelihood).

The runs are ordinary ``nodebench train`` runs (tasks :class:`nodebench.tasks.DensityMatching`
and :class:`nodebench.tasks.MaximumLikelihood`; models ``cnf`` and ``planar_nf``; presets
``conf/experiment/chen2018_cnf_density.yaml`` and ``chen2018_cnf_mle.yaml``). The builders read
only their run records (summary.json, density.pt) and write a table (Markdown + CSV) with the
paper's claim beside the measured numbers, figures laid out as the paper's (PNG) and README.md.
The paper gives its losses only as figures: no paper number appears in a measured column.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..tables import max_load, mean_std, quiet_verdict, shown_path

TITLES = {"cnf": "CNF", "planar_nf": "NF"}
CLAIM_DENSITY = ("Chen et al. 2018 (Figure 4, values only in the figure): the CNF, trained "
                 "10,000 iterations with Adam, generally reaches a lower loss than the planar NF "
                 "of as many layers as the CNF has hidden units, trained 500,000 iterations with "
                 "RMSprop.")
CLAIM_MLE = ("Chen et al. 2018 (Figure 5, qualitative): a CNF with 64 hidden units fits Two "
             "Circles and Two Moons; the NF of 64 one-unit layers has difficulty with Two Moons.")


def _collect(runs: Path, task: str):
    """One row per run record of ``task`` under ``runs`` (None when there is none)."""
    import pandas as pd

    rows = []
    for path in sorted(runs.rglob("summary.json")):
        s = json.loads(path.read_text())
        if s.get("task") != task:
            continue
        c = s["config"]
        rows.append({"model": s["model"], "dataset": s["dataset"],
                     "target": c["dataset"].get("target", c["dataset"].get("sampler")),
                     "units": int(c["model"]["units"]), "seed": s["seed"],
                     "status": s["status"], "error": s.get("error"),
                     **{k: s.get(k) for k in ("test_kl", "test_loss", "test_nll", "train_loss",
                                              "nfe_forward", "nfe_backward", "nfe_eval",
                                              "iter_s", "iterations", "params", "wall_time_s",
                                              "validity_reference_error",
                                              "validity_roundtrip_error", "valid", "device",
                                              "threads", "load_start", "load_end")},
                     "optimizer": c["optim"]["name"], "lr": c["optim"]["optimizer"]["lr"],
                     "batch": c["trainer"]["batch_size"], "solver": s.get("solver_desc"),
                     "gradient": s.get("gradient"),
                     "run": str(path.parent.relative_to(runs))})
    if not rows:
        return None
    frame = pd.DataFrame(rows).sort_values(["target", "units", "model", "seed"], kind="stable")
    return frame.reset_index(drop=True)


def _budget(frame, profile: str, results: Path) -> str:
    parts = []
    for model, group in frame.groupby("model", sort=False):
        g = group.iloc[0]
        solve = (f", {g['solver']}, {g['gradient']} gradients" if isinstance(g["solver"], str)
                 else "")
        parts.append(f"{TITLES.get(model, model)}: {int(g['iterations'])} iterations of "
                     f"{int(g['batch'])} points, {g['optimizer']} lr {g['lr']:g}{solve}")
    seeds = ", ".join(str(s) for s in sorted(frame["seed"].unique()))
    text = (f"Budget (profile `{profile}`): {'; '.join(parts)}; seeds {seeds}; "
            f"{frame.iloc[0]['device']}, {int(frame.iloc[0]['threads'])} thread(s) per run; "
            f"{len(frame)} runs, wall time {frame['wall_time_s'].sum():.0f} s summed over runs; "
            f"1-min load at the runs' start/end at most {max_load(frame):.2f}.")
    quiet = quiet_verdict(results)
    return text + (f" Machine: `{quiet}`" if quiet else "")


def _cell(group, column: str, fmt: str) -> str:
    return mean_std(group[column], fmt) if len(group) else "-"


def _validity(group) -> str:
    if not len(group) or group["valid"].isna().all():
        return "-"
    ok = int(group["valid"].fillna(False).astype(bool).sum())
    worst = max(float(group["validity_reference_error"].max()),
                float(group["validity_roundtrip_error"].max()))
    return f"{ok}/{len(group)} (max err {worst:.1e})"


def _density_table(frame):
    rows = []
    for (target, units), group in frame.groupby(["target", "units"], sort=True):
        nf, cnf = group[group["model"] == "planar_nf"], group[group["model"] == "cnf"]
        row = {"target": target, "K = M": units,
               "NF KL (nats)": _cell(nf, "test_kl", ".3f"),
               "CNF KL (nats)": _cell(cnf, "test_kl", ".3f"),
               "lower": ("CNF" if cnf["test_kl"].mean() < nf["test_kl"].mean() else "NF")
               if len(nf) and len(cnf) else "-",
               "CNF NFE f/b": (f"{cnf['nfe_forward'].mean():.1f}/{cnf['nfe_backward'].mean():.1f}"
                               if len(cnf) else "-"),
               "NF s/iter": _cell(nf, "iter_s", ".4f"), "CNF s/iter": _cell(cnf, "iter_s", ".4f"),
               "CNF solve valid": _validity(cnf)}
        rows.append(row)
    return rows


def _likelihood_table(frame):
    rows = []
    for (dataset, model), group in frame.groupby(["dataset", "model"], sort=True):
        ode = model == "cnf"
        rows.append({"dataset": dataset, "model": f"{TITLES.get(model, model)} "
                     f"({'M' if ode else 'K'} = {int(group['units'].iloc[0])})",
                     "test NLL (nats)": _cell(group, "test_nll", ".3f"),
                     "NFE f/b": (f"{group['nfe_forward'].mean():.1f}/"
                                 f"{group['nfe_backward'].mean():.1f}" if ode else "-"),
                     "s/iter": _cell(group, "iter_s", ".4f"),
                     "iterations": int(group["iterations"].iloc[0]),
                     "solve valid": _validity(group) if ode else "-"})
    return rows


def _markdown(rows) -> list[str]:
    import pandas as pd

    return pd.DataFrame(rows).to_markdown(index=False).splitlines()


def _load(runs: Path, run: str) -> dict | None:
    path = runs / run / "density.pt"
    return torch.load(path) if path.exists() else None


def _image(ax, logp, limit: float, title: str) -> None:
    ax.imshow(torch.exp(logp).numpy(), origin="lower", extent=(-limit, limit, -limit, limit),
              cmap="viridis")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _density_figure(runs: Path, results: Path, frame) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = int(frame["seed"].min())
    targets = sorted(frame["target"].unique())
    units = sorted(frame["units"].unique())
    cols = 1 + 2 * len(units)
    fig, axes = plt.subplots(len(targets), cols, figsize=(1.9 * cols, 1.9 * len(targets)),
                             squeeze=False)
    for i, target in enumerate(targets):
        first = None
        for j, (model, k) in enumerate([(m, k) for m in ("planar_nf", "cnf") for k in units]):
            match = frame[(frame["target"] == target) & (frame["units"] == k)
                          & (frame["model"] == model) & (frame["seed"] == seed)]
            art = _load(runs, match["run"].iloc[0]) if len(match) else None
            ax = axes[i, 1 + j]
            if art is None:
                ax.axis("off")
                continue
            first = first or art
            kl = match["test_kl"].iloc[0]
            _image(ax, art["log_density"], art["limit"],
                   f"{TITLES[model]} {'K' if model == 'planar_nf' else 'M'}={k}\nKL {kl:.3f}")
        if first is not None:
            _image(axes[i, 0], first["target_log_density"], first["limit"], f"target {target}")
        else:
            axes[i, 0].axis("off")
    fig.suptitle("Density matching (Chen et al. 2018 Fig. 4): target, NF, CNF", fontsize=9)
    fig.tight_layout()
    fig.savefig(results / "density_matching.png", dpi=110)
    plt.close(fig)
    return "density_matching.png"


def _likelihood_figure(runs: Path, results: Path, frame) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = int(frame["seed"].min())
    datasets = sorted(frame["dataset"].unique())
    fig, axes = plt.subplots(len(datasets), 5, figsize=(10, 2.1 * len(datasets)), squeeze=False)
    for i, name in enumerate(datasets):
        col = 1
        shown = False
        for model in ("planar_nf", "cnf"):
            match = frame[(frame["dataset"] == name) & (frame["model"] == model)
                          & (frame["seed"] == seed)]
            art = _load(runs, match["run"].iloc[0]) if len(match) else None
            if art is None:
                axes[i, col].axis("off")
                axes[i, col + 1].axis("off")
                col += 2
                continue
            lim = art["limit"]
            if not shown:
                d = art["data"]
                axes[i, 0].scatter(d[:, 0], d[:, 1], s=1, alpha=0.4)
                axes[i, 0].set_title(f"{name}: held-out data", fontsize=8)
                shown = True
            nll = match["test_nll"].iloc[0]
            _image(axes[i, col], art["log_density"], lim, f"{TITLES[model]} density\nNLL {nll:.3f}")
            s = art["samples"]
            axes[i, col + 1].scatter(s[:, 0], s[:, 1], s=1, alpha=0.4, color="C1")
            axes[i, col + 1].set_title(f"{TITLES[model]} samples", fontsize=8)
            col += 2
        for ax in axes[i]:
            ax.set_xlim(-4, 4)
            ax.set_ylim(-4, 4)
            ax.set_xticks([])
            ax.set_yticks([])
        if not shown:
            axes[i, 0].axis("off")
    fig.suptitle("Maximum likelihood (Chen et al. 2018 Fig. 5): data, NF, CNF", fontsize=9)
    fig.tight_layout()
    fig.savefig(results / "maximum_likelihood.png", dpi=110)
    plt.close(fig)
    return "maximum_likelihood.png"


def _failed(frame) -> list[str]:
    bad = frame[frame["status"] != "ok"]
    return [f"- FAILED: {r['model']} {r['target']} units {r['units']} seed {r['seed']}: "
            f"{r['error']}" for _, r in bad.iterrows()]


def _write(results: Path, frame, rows, name: str, title: str, claim: str, verdict: str,
           figure: str | None, budget: str, runs: Path) -> None:
    import pandas as pd

    results.mkdir(parents=True, exist_ok=True)
    frame.drop(columns=["load_start", "load_end"]).to_csv(results / "runs.csv", index=False)
    pd.DataFrame(rows).to_csv(results / f"{name}.csv", index=False)
    table = "\n".join(_markdown(rows))
    (results / f"{name}.md").write_text(f"### {title}\n\n{budget}\n\n{table}\n")
    lines = [f"# {title}", "", budget, "", table, "", f"**Paper.** {claim}", "",
             f"**Measured.** {verdict}", ""]
    if figure:
        lines += [f"![{title}]({figure})", ""]
    lines += _failed(frame)
    lines += ["", ("Regenerate: `make reproduce-cnf` (finished runs are skipped, the report is "
              f"rewritten from the run records in `{shown_path(runs)}`). KL and NLL in nats; `s/iter`: mean "
              "seconds per training iteration; NFE f/b: mean function evaluations per training "
              "iteration, forward and backward (adjoint); `solve valid`: runs whose last "
              "end-of-epoch check (reference dopri5 1e-8 float64 solve and round trip on 256 "
              "points) was below 1e-2, and the largest error."), ""]
    (results / "README.md").write_text("\n".join(lines))


def density_report(runs: Path, results: Path, profile: str) -> bool:
    """Figure 4's comparison from the density-matching runs under ``runs``: ``density.md/.csv``
    (KL by target and K = M), ``density_matching.png``, ``runs.csv``, README.md. Returns False
    when there is no run record."""
    frame = _collect(runs, "density_matching")
    if frame is None:
        print(f"[cnf] report: no density-matching run records in {runs}/", file=sys.stderr)
        return False
    rows = _density_table(frame)
    pairs = [r for r in rows if r["lower"] != "-"]
    wins = sum(r["lower"] == "CNF" for r in pairs)
    verdict = (f"the CNF reaches the lower KL in {wins} of {len(pairs)} (target, size) pairs "
               f"at this budget. KL here is the loss E_q[log q + U] plus log Z of the target "
               f"on the box [-4, 4]^2 (nodebench.cnf.log_partition); U2-U4 do not decay along "
               f"z1, so a flow that spreads mass outside the box can score below 0: compare "
               f"the two flows within a row (same constant), not the values with 0.")
    results.mkdir(parents=True, exist_ok=True)
    figure = _density_figure(runs, results, frame)
    _write(results, frame, rows, "density", "Density matching: CNF vs planar NF (Chen et al. "
           "2018 Figure 4)", CLAIM_DENSITY, verdict, figure, _budget(frame, profile, results),
           runs)
    print(f"[cnf] density report in {results}/", flush=True)
    return True


def likelihood_report(runs: Path, results: Path, profile: str) -> bool:
    """Figure 5's comparison from the maximum-likelihood runs under ``runs``: ``likelihood.md/
    .csv`` (test NLL by dataset and model), ``maximum_likelihood.png``, ``runs.csv``,
    README.md. Returns False when there is no run record."""
    frame = _collect(runs, "maximum_likelihood")
    if frame is None:
        print(f"[cnf] report: no maximum-likelihood run records in {runs}/", file=sys.stderr)
        return False
    rows = _likelihood_table(frame)
    parts = []
    for name, group in frame.groupby("dataset", sort=True):
        nll = {m: group[group["model"] == m]["test_nll"].mean() for m in ("cnf", "planar_nf")}
        if all(math.isfinite(v) for v in nll.values()):
            better = "CNF" if nll["cnf"] < nll["planar_nf"] else "NF"
            parts.append(f"{name}: test NLL CNF {nll['cnf']:.3f} vs NF {nll['planar_nf']:.3f} "
                         f"nats ({better} lower, by {abs(nll['cnf'] - nll['planar_nf']):.3f})")
    verdict = "; ".join(parts) + "." if parts else "no complete pair."
    results.mkdir(parents=True, exist_ok=True)
    figure = _likelihood_figure(runs, results, frame)
    _write(results, frame, rows, "likelihood", "Maximum likelihood: CNF vs planar NF (Chen et "
           "al. 2018 Figure 5)", CLAIM_MLE, verdict, figure, _budget(frame, profile, results),
           runs)
    print(f"[cnf] likelihood report in {results}/", flush=True)
    return True


__all__ = ["density_report", "likelihood_report"]
