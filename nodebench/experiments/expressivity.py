"""`make reproduce-expressivity` = ``nodebench reproduce seed000_expressivity``: trajectory-length
expressivity of random FFN, Neural ODE, CT-RNN and LTC models (seed 000; Raghu et al. 2017's
measure; docs/reference.md section 3). Nothing is trained; the preset
(conf/experiment/seed000_expressivity.yaml, its settings under ``expressivity``) has no sweep and
runs these stages (``reproduce.after``), each ``stage(runs, results, cfg)``:

  :func:`depth_stage`  a 6-layer FFN (width 100) vs a Neural ODE whose f is such a net: length
                       after each layer (FFN) / at t = l/6 (Neural ODE), per activation and weight
                       scaling (``depth_draws.csv``, ``depth_projections.pt``, ``depth_meta.json``
                       in the run folder)
  :func:`cells_stage`  single-layer Neural ODE, CT-RNN and LTC cells of width k driven by the
                       circle as an input time series: length of the latent trajectory h(t),
                       t in [0, 2 pi] (``cells_*`` files)

then :func:`report_stage`: tables (Markdown, CSV), figures (PNG) and README.md into the results
folder, built only from the files the two stages wrote. Profiles: ``cpu`` (the preset; a few
minutes on one CPU core), ``paper`` (more draws, denser sampling), ``tiny`` (seconds: CI).
"""

from __future__ import annotations

import itertools
import json
import time
import zlib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import classify_solver_error
from ..expressivity import (
    CELLS,
    MODEL_NAMES,
    DeepNet,
    DeepNetDynamics,
    InputSignal,
    cell_trajectory,
    circle,
    node_layer_trajectories,
    pca_2d,
    trajectory_length,
)
from ..instruments import NFECounter
from ..solvers import Solver
from ..tables import pm

# Weights N(0, sigma_w2 [/ fan-in]), biases N(0, sigma_b2): the seed's values.
SIGMA_W2 = 2.0
SIGMA_B2 = 1.0

CELL_TAU = 1.0  # time constant of CT-RNN and LTC cells (the seed gives none)


def _generator(seed: int, *key: object) -> torch.Generator:
    """A generator seeded from the configuration's name, so adding a configuration leaves the
    draws of the others unchanged."""
    name = "/".join(str(k) for k in key)
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _rows(base: dict, traj: torch.Tensor, **extra: object) -> list[dict]:
    """One row per draw of a trajectory batch (R, N, D): length, sampling check, 2-PC share."""
    lengths = trajectory_length(traj)
    half = trajectory_length(traj[:, ::2])  # every other sample: the sampling-density check
    rows = []
    for r in range(traj.shape[0]):
        _, frac = pca_2d(traj[r])
        rows.append({**base, "draw": r, "length": float(lengths[r]),
                     "length_half_sampling": float(half[r]), "pc2_variance": frac, **extra})
    return rows


def stage_depth(profile: dict, seed: int) -> tuple[list[dict], dict]:
    """FFN layers vs Neural ODE time slices. Returns rows and draw-0 trajectories for plots."""
    _t, x = circle(profile["points"])
    draws, depth, width = profile["deep_draws"], profile["depth"], profile["deep_width"]
    xs = x.expand(draws, -1, -1)
    solver = Solver("dopri5", rtol=profile["node_tol"], atol=profile["node_tol"],
                    max_num_steps=profile["max_num_steps"])
    # tolerance check: the same solve 10x looser; the lengths should barely move
    loose = Solver("dopri5", rtol=10 * profile["node_tol"], atol=10 * profile["node_tol"],
                   max_num_steps=profile["max_num_steps"])
    rows, keep = [], {}
    for scaling in profile["scalings"]:
        for act in profile["deep_activations"][scaling]:
            common = {"study": "depth", "scaling": scaling, "activation": act, "width": width}
            for model in ("ffn", "node6"):
                base = {**common, "model": model}
                rows += _rows({**base, "layer": 0}, xs, nfe=0, seconds=0.0, status="ok")
                started = time.perf_counter()
                gen = _generator(seed, "depth", scaling, model, act, width)
                in_dim = 2 if model == "ffn" else width
                net = DeepNet.random(draws, in_dim, width, depth, act, SIGMA_W2, SIGMA_B2,
                                     scaling, gen)
                nfe = 0
                if model == "ffn":
                    with torch.no_grad():
                        layers = net.layers(xs)
                else:
                    func = DeepNetDynamics(net)
                    counter = NFECounter(func)
                    try:
                        with counter.phase_("forward"):
                            layers = node_layer_trajectories(func, xs, solver)
                    except AssertionError as exc:
                        reason = classify_solver_error(exc)
                        if reason is None:
                            raise
                        print(f"[expressivity] {scaling} {act} {model}: failed: {reason}",
                              flush=True)
                        rows.append({**base, "layer": depth, "draw": -1, "length": float("nan"),
                                     "status": f"failed: {reason}",
                                     "seconds": time.perf_counter() - started,
                                     "nfe": counter.take("forward")})
                        continue
                    nfe = counter.take("forward")
                seconds = time.perf_counter() - started
                if model == "ffn":
                    checks = [traj.new_full(traj.shape[:1], float("nan")) for traj in layers]
                else:
                    checks = [trajectory_length(h) for h in
                              node_layer_trajectories(func, xs, loose)]
                for layer, traj in enumerate(layers, start=1):
                    new = _rows({**base, "layer": layer}, traj, nfe=nfe, seconds=seconds,
                                status="ok")
                    for r, row in enumerate(new):
                        row["length_tol_x10"] = float(checks[layer - 1][r])
                    rows += new
                keep[(scaling, act, model)] = [x] + [a[0] for a in layers]
                last = [r["length"] for r in rows[-draws:]]
                print(f"[expressivity] depth {scaling:6s} {act:7s} {model:5s} L{depth} length "
                      f"{sum(last) / len(last):.4g} (nfe {nfe}, {seconds:.1f} s)", flush=True)
    return rows, keep


def stage_cells(profile: dict, seed: int) -> tuple[list[dict], dict]:
    """Single-layer cells driven by the circle. rk4 on the sample grid; the same solve at half the
    step gives the solver check (``length_half_step``)."""
    t, x = circle(profile["points"])
    signal = InputSignal(t, x)
    dt = float(t[1] - t[0])
    solver = Solver("rk4", step_size=dt)
    fine_solver = Solver("rk4", step_size=dt / 2)
    t_fine = torch.linspace(float(t[0]), float(t[-1]), 2 * len(t) - 1, dtype=t.dtype)
    rows, keep = [], {}
    for scaling in profile["scalings"]:
        for act in profile["activations"]:
            for model, cls in CELLS.items():
                for width in profile["widths"]:
                    started = time.perf_counter()
                    gen = _generator(seed, "cells", scaling, model, act, width)
                    cell = cls.random(profile["draws"], width, signal, act, SIGMA_W2, SIGMA_B2,
                                      scaling, gen, tau=CELL_TAU)
                    counter = NFECounter(cell)
                    with counter.phase_("forward"):
                        traj = cell_trajectory(cell, t, solver)
                    nfe = counter.take("forward")
                    seconds = time.perf_counter() - started
                    fine = cell_trajectory(cell, t_fine, fine_solver)[:, ::2]
                    fine_len = trajectory_length(fine)
                    base = {"study": "cells", "scaling": scaling, "activation": act,
                            "model": model, "width": width, "layer": 1}
                    new = _rows(base, traj, nfe=nfe, seconds=seconds, status="ok")
                    for r, row in enumerate(new):
                        row["length_half_step"] = float(fine_len[r])
                    rows += new
                    keep[(scaling, act, model, width)] = traj[0]
                    mean = sum(r["length"] for r in new) / len(new)
                    print(f"[expressivity] cells {scaling:6s} {act:7s} {model:5s} k={width:3d} "
                          f"length {mean:.4g} ({seconds:.1f} s)", flush=True)
    return rows, keep


def _project(keep: dict) -> dict:
    """2-D PCA projections (and lengths) of the kept draw-0 trajectories, for the figures."""
    out = {}
    for key, value in keep.items():
        trajs = value if isinstance(value, list) else [value]
        out[key] = [(pca_2d(tr)[0].float(), float(trajectory_length(tr))) for tr in trajs]
    return out


# ---------------------------------------------------------------------------------------------
# Report: tables, claims, figures, README (only from the files written by the stages above)
# ---------------------------------------------------------------------------------------------

SCALING_TEXT = {"none": "W ~ N(0, 2) per entry, unscaled (the seed's literal N(0, sigma^2 = 2))",
                "fan_in": "W ~ N(0, 2 / fan-in) (Raghu et al. 2017, Hasani et al. 2021)"}
ACT_ORDER = ["relu", "sigmoid", "tanh"]
SEED_DEPTH = {"ffn": "grows exponentially with depth", "node6": "barely changes layer to layer"}
SEED_CELLS = {"node": "does not change the trajectory", "ctrnn": "does not change the trajectory",
              "ltc": "complex patterns; length grows (exponentially) with k"}


def _scalings(frame) -> list[str]:
    """The weight scalings present, the seed's literal one first."""
    present = set(frame["scaling"])
    return [s for s in ("none", "fan_in") if s in present]


def _pm(mean: float, std: float) -> str:
    return pm(mean, std, ".4g", ".2g")


def _summary(draws, keys: list[str]):
    ok = draws[draws["status"] == "ok"]
    g = ok.groupby(keys)
    out = g["length"].agg(["mean", "std", "count"]).reset_index()
    out["pc2_variance"] = g["pc2_variance"].mean().values
    out["half_sampling_rel_change"] = g.apply(
        lambda d: float(((d["length_half_sampling"] - d["length"]).abs() / d["length"]).max()),
        include_groups=False).values
    out["nfe"] = g["nfe"].max().values
    for column, name in (("length_tol_x10", "tol_x10_rel_change"),
                         ("length_half_step", "half_step_rel_change")):
        if column in ok:
            out[name] = g.apply(
                lambda d, c=column: float(((d[c] - d["length"]).abs() / d["length"]).max()),
                include_groups=False).values
    return out


def _growth(means: list[float]) -> tuple[float, float]:
    """Per-layer growth factor exp(slope) of a least-squares line through log(length) vs layer,
    and the fit's R^2."""
    import numpy as np

    y = np.log(np.asarray(means, dtype=float))
    x = np.arange(1, len(y) + 1, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (resid ** 2).sum() / total if total > 0 else 1.0
    return float(np.exp(slope)), float(r2)


def _depth_tables(depth, meta: dict) -> tuple[str, str, object]:
    """Markdown tables (one per scaling) of length per layer, the claims text, and the CSV."""
    summ = _summary(depth, ["scaling", "model", "activation", "layer"])
    failed = depth[depth["status"] != "ok"]
    md, claims = [], []
    for scaling in _scalings(summ):
        s = summ[summ["scaling"] == scaling]
        layers = sorted(s["layer"].unique())
        head = ["model", "activation"] + ["input" if l == 0 else f"L{l}" for l in layers] + \
               [f"growth / layer (fit L1-L{layers[-1]})", "NFE", "check: sampling / tol",
                "seed (qualitative)"]
        md.append(f"\n#### Weights: {SCALING_TEXT[scaling]}\n")
        md.append("| " + " | ".join(head) + " |")
        md.append("|" + " --- |" * len(head))
        for model in ("ffn", "node6"):
            for act in [a for a in ACT_ORDER if a in set(s["activation"])]:
                r = s[(s["model"] == model) & (s["activation"] == act)].sort_values("layer")
                if r.empty:
                    continue
                if len(r) < len(layers):  # the solve failed
                    why = failed[(failed["scaling"] == scaling) & (failed["model"] == model)
                                 & (failed["activation"] == act)]["status"]
                    cells = [_pm(r["mean"].iloc[0], r["std"].iloc[0])] + \
                            [why.iloc[0] if len(why) else "failed"] + [""] * (len(layers) - 2)
                    md.append(f"| {MODEL_NAMES[model]} | {act} | " + " | ".join(cells)
                              + f" | - | - | - | {SEED_DEPTH[model]} |")
                    continue
                means = r["mean"].tolist()
                factor, r2 = _growth(means[1:])
                nfe = "-" if model == "ffn" else str(int(r["nfe"].max()))
                deep = r[r["layer"] > 0]
                check = f"{deep['half_sampling_rel_change'].max():.2g}"
                check += " / -" if model == "ffn" else \
                    f" / {deep['tol_x10_rel_change'].max():.2g}"
                md.append(f"| {MODEL_NAMES[model]} | {act} | "
                          + " | ".join(_pm(m, sd) for m, sd in zip(r["mean"], r["std"]))
                          + f" | x{factor:.3g} (R² {r2:.2f}) | {nfe} | {check} | "
                            f"{SEED_DEPTH[model]} |")
                ratio = means[-1] / means[0]
                if model == "ffn":
                    verdict = ("grows exponentially" if factor > 1.05 and r2 > 0.9 else
                               "grows, but not log-linearly" if factor > 1.05 else
                               "does NOT grow (it shrinks)" if factor < 0.95 else "stays flat")
                    claims.append(f"- FFN, {act}, {scaling} weights: {verdict}: x{factor:.3g} per "
                                  f"layer (R² {r2:.2f}); L{layers[-1]} / input = {ratio:.3g}.")
                else:
                    verdict = ("barely changes" if 2 / 3 < ratio < 1.5 else
                               "changes a lot")
                    claims.append(f"- Neural ODE (6-layer f), {act}, {scaling} weights: {verdict}: "
                                  f"length at t=1 / input length = {ratio:.3g}; per time slice "
                                  f"x{factor:.3g} (R² {r2:.2f}).")
    return "\n".join(md), "\n".join(claims), summ


def _cell_tables(cells) -> tuple[str, str, object]:
    summ = _summary(cells, ["scaling", "model", "activation", "width"])
    md, claims = [], []
    two_pi = 2 * 3.141592653589793
    for scaling in _scalings(summ):
        s = summ[summ["scaling"] == scaling]
        widths = sorted(s["width"].unique())
        head = ["model", "activation"] + [f"k={k}" for k in widths] + \
               [f"k={widths[-1]} / k={widths[0]}", f"2-PC variance share (k={widths[-1]})",
                "check: sampling / half step", "seed (qualitative)"]
        md.append(f"\n#### Weights: {SCALING_TEXT[scaling]}\n")
        md.append("| " + " | ".join(head) + " |")
        md.append("|" + " --- |" * len(head))
        for model in CELLS:
            for act in [a for a in ACT_ORDER if a in set(s["activation"])]:
                r = s[(s["model"] == model) & (s["activation"] == act)].sort_values("width")
                means = r["mean"].tolist()
                ratio = means[-1] / means[0]
                md.append(f"| {MODEL_NAMES[model]} | {act} | "
                          + " | ".join(_pm(m, sd) for m, sd in zip(r["mean"], r["std"]))
                          + f" | {ratio:.3g} | {r['pc2_variance'].iloc[-1]:.3f} | "
                            f"{r['half_sampling_rel_change'].max():.2g} / "
                            f"{r['half_step_rel_change'].max():.2g} | {SEED_CELLS[model]} |")
        for act in [a for a in ACT_ORDER if a in set(s["activation"])]:
            by = {m: s[(s["model"] == m) & (s["activation"] == act)].sort_values("width")
                  for m in CELLS}
            ltc = by["ltc"]["mean"].tolist()
            monotone = all(b > a for a, b in itertools.pairwise(ltc))
            others = {m: by[m]["mean"].tolist()[-1] for m in ("node", "ctrnn")}
            claims.append(
                f"- cells, {act}, {scaling} weights: LTC length "
                + " -> ".join(f"{v:.3g}" for v in ltc)
                + f" over k = {', '.join(str(k) for k in widths)} "
                + ("(grows with width" if monotone else "(does NOT grow monotonically with width")
                + f", x{ltc[-1] / ltc[0]:.3g}); at k={widths[-1]}: Neural ODE {others['node']:.3g}, "
                f"CT-RNN {others['ctrnn']:.3g}, LTC {ltc[-1]:.3g} (input circle: {two_pi:.3g}); "
                + ("LTC is the longest." if ltc[-1] > max(others.values()) else
                   "LTC is NOT the longest."))
    return "\n".join(md), "\n".join(claims), summ


def _plot_projection(ax, proj, length: float, title: str = "") -> None:
    ax.plot(proj[:, 0].numpy(), proj[:, 1].numpy(), lw=0.8)
    ax.set_title(f"{title}{length:.3g}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _figures(runs: Path, results: Path, depth_summ, cell_summ) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if depth_summ is not None:
        proj = torch.load(runs / "depth_projections.pt")
        for scaling in _scalings(depth_summ):
            keys = [k for k in proj if k[0] == scaling]
            fig, axes = plt.subplots(len(keys), len(proj[keys[0]]),
                                     figsize=(1.6 * len(proj[keys[0]]), 1.7 * len(keys)),
                                     squeeze=False)
            for row, key in enumerate(keys):
                for col, (p, length) in enumerate(proj[key]):
                    _plot_projection(axes[row, col], p, length,
                                     "input: " if col == 0 else f"L{col}: ")
                axes[row, 0].set_ylabel(f"{MODEL_NAMES[key[2]].split(' (')[0]}\n{key[1]}",
                                        fontsize=8)
            fig.suptitle(f"latent trajectories (first 2 PCs, draw 0), length above each; "
                         f"weights {scaling}", fontsize=9)
            fig.tight_layout()
            name = f"depth_projections_{scaling}.png"
            fig.savefig(results / name, dpi=110)
            plt.close(fig)
            made.append(name)
        scalings = _scalings(depth_summ)
        fig, axes = plt.subplots(1, len(scalings), figsize=(5 * len(scalings), 3.6), squeeze=False)
        for ax, scaling in zip(axes[0], scalings):
            s = depth_summ[depth_summ["scaling"] == scaling]
            for (model, act), r in s.groupby(["model", "activation"]):
                r = r.sort_values("layer")
                ax.errorbar(r["layer"], r["mean"], yerr=r["std"], capsize=2,
                            ls="-" if model == "ffn" else "--", marker="o", ms=3,
                            label=f"{MODEL_NAMES[model].split(' (')[0]} {act}")
            ax.set_yscale("log")
            ax.set_xlabel("layer (FFN) / 6 t (Neural ODE); 0 = input")
            ax.set_ylabel("trajectory length")
            ax.set_title(f"weights: {scaling}", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results / "depth_length.png", dpi=110)
        plt.close(fig)
        made.append("depth_length.png")
    if cell_summ is not None:
        proj = torch.load(runs / "cells_projections.pt")
        for scaling in _scalings(cell_summ):
            acts = [a for a in ACT_ORDER if a in set(cell_summ["activation"])]
            widths = sorted(cell_summ["width"].unique())
            fig, axes = plt.subplots(len(CELLS) * len(acts), len(widths),
                                     figsize=(1.9 * len(widths), 1.8 * len(CELLS) * len(acts)),
                                     squeeze=False)
            row = 0
            for act in acts:
                for model in CELLS:
                    for col, k in enumerate(widths):
                        p, length = proj[(scaling, act, model, k)][0]
                        _plot_projection(axes[row, col], p, length, f"k={k}: ")
                    axes[row, 0].set_ylabel(f"{MODEL_NAMES[model]}\n{act}", fontsize=8)
                    row += 1
            fig.suptitle(f"cells: h(t) on first 2 PCs (draw 0),\nlength above; weights {scaling}",
                         fontsize=9)
            fig.tight_layout()
            name = f"cells_projections_{scaling}.png"
            fig.savefig(results / name, dpi=110)
            plt.close(fig)
            made.append(name)
        scalings = _scalings(cell_summ)
        acts = [a for a in ACT_ORDER if a in set(cell_summ["activation"])]
        fig, axes = plt.subplots(len(scalings), len(acts), figsize=(3.6 * len(acts),
                                 3.0 * len(scalings)), squeeze=False)
        for i, scaling in enumerate(scalings):
            for j, act in enumerate(acts):
                ax = axes[i, j]
                s = cell_summ[(cell_summ["scaling"] == scaling) & (cell_summ["activation"] == act)]
                for model in CELLS:
                    r = s[s["model"] == model].sort_values("width")
                    ax.errorbar(r["width"], r["mean"], yerr=r["std"], marker="o", ms=3,
                                capsize=2, label=MODEL_NAMES[model])
                ax.axhline(2 * 3.141592653589793, color="grey", lw=0.6, ls=":")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{act}, weights {scaling}", fontsize=9)
                ax.set_xlabel("width k")
                ax.set_ylabel("length of h(t)")
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results / "cells_length.png", dpi=110)
        plt.close(fig)
        made.append("cells_length.png")
    return made


def report(runs: Path, results: Path) -> None:
    """Write tables (Markdown + CSV), figures and README.md for the stages found in ``runs``."""
    import pandas as pd

    results.mkdir(parents=True, exist_ok=True)
    parts, claims, budget = [], [], []
    depth_summ = cell_summ = None
    checks = []
    for stage in ("depth", "cells"):
        path = runs / f"{stage}_draws.csv"
        if not path.exists():
            continue
        meta = json.loads((runs / f"{stage}_meta.json").read_text())
        draws = pd.read_csv(path)
        draws.to_csv(results / f"{stage}_draws.csv", index=False)
        budget.append(
            f"- {stage}: profile `{meta['profile']}`, {meta['points']} circle samples on "
            f"[0, 2 pi], {meta['n_draws']} weight draws per configuration, sigma_w^2 = "
            f"{meta['sigma_w2']:g}, sigma_b^2 = {meta['sigma_b2']:g}, CPU ({meta['threads']} "
            f"thread(s)), torch {meta['torch']}, wall time {meta['wall_s']:.0f} s")
        if stage == "depth":
            md, text, depth_summ = _depth_tables(draws, meta)
            depth_summ.to_csv(results / "depth_lengths.csv", index=False)
            title = (f"### Length after each layer: {meta['depth']}-layer FFN (width "
                     f"{meta['deep_width']}) vs Neural ODE with that net as f (dopri5, rtol = atol "
                     f"= {meta['node_tol']:g}; layer l = state at t = l/{meta['depth']})\n\n"
                     f"Mean ± std over {meta['n_draws']} draws. {budget[-1][2:]}. The seed states "
                     "no numbers in its text (its figures' labels were images), so its column is "
                     "its qualitative claim.\n")
            ode = draws[(draws["model"] == "node6") & (draws["layer"] > 0)].dropna(
                subset=["length_tol_x10"])
            tol_change = ((ode["length_tol_x10"] - ode["length"]).abs() / ode["length"]).max()
            checks.append(f"- depth study, sampling check (length from every other sample vs "
                          f"all): largest relative change "
                          f"{depth_summ['half_sampling_rel_change'].max():.3g}; Neural ODE "
                          f"tolerance check (dopri5 at 10x looser rtol/atol): largest relative "
                          f"change {tol_change:.3g}")
        else:
            md, text, cell_summ = _cell_tables(draws)
            cell_summ.to_csv(results / "cells_lengths.csv", index=False)
            title = (f"### Single-layer cells driven by the circle: length of h(t), t in "
                     f"[0, 2 pi], h(0) = 0 (rk4 with the sample spacing as step; tau = "
                     f"{meta['tau']:g})\n\nMean ± std over {meta['n_draws']} draws. "
                     f"{budget[-1][2:]}. The seed's column is its qualitative claim.\n")
            checks.append(f"- cells, sampling check (every other sample): largest relative change "
                          f"{cell_summ['half_sampling_rel_change'].max():.3g}; solver check (rk4 "
                          f"at half the step): largest relative change "
                          f"{cell_summ['half_step_rel_change'].max():.3g}")
        (results / f"{stage}_lengths.md").write_text(title + md + "\n")
        parts.append(title + md + "\n")
        claims.append(text)
    figures = _figures(runs, results, depth_summ, cell_summ)
    readme = [
        "# Trajectory-length expressivity (seed 000), measured",
        "",
        ("Made by `make reproduce-expressivity` (`nodebench reproduce seed000_expressivity "
        "profile=<cpu|paper|tiny>`); every number below comes from that run's "
        "`*_draws.csv` (one row per weight draw), re-aggregated by its report step."),
        "",
        ("Setup: input circle x(t) = (sin t, cos t), t in [0, 2 pi] (length 2 pi = 6.283). "
        "Models are random and untrained; biases N(0, 1). Two weight scalings: `none` = "
        "the seed's literal N(0, 2) per entry; `fan_in` = N(0, 2/fan-in) as in Raghu et al. "
        "2017 and Hasani et al. 2021. Projections are on the first two principal components "
        "of each latent curve (draw 0); the number over each panel is the curve's length in "
        "the full latent space. Lengths are those of the polyline through the samples."),
        "",
        "Budget:",
        *budget,
        "",
        ("Checks (largest relative change of a length; per row in the tables' check column): "
         "`sampling` = the same curve measured on every other sample (large = the polyline "
         "under-resolves the curve: the length is a lower bound); `tol` = the Neural ODE solved "
         "with 10x looser rtol/atol; `half step` = the cells solved with rk4 at half the step."),
        *checks,
        "",
        "## Claims of the seed vs what was measured",
        "",
        *claims,
        "",
        "## Tables",
        "",
        *parts,
        "",
        "## Figures",
        "",
        *[f"![{f}]({f})" for f in figures],
        "",
        ("Files: `depth_lengths.{md,csv}`, `cells_lengths.{md,csv}` (aggregates), "
        "`depth_draws.csv`, `cells_draws.csv` (per draw: length, length from every other "
        "sample, share of variance in 2 PCs, NFE, seconds; cells also the length with rk4 at "
        "half the step)."),
    ]
    (results / "README.md").write_text("\n".join(readme) + "\n")


def _measure(stage: str, runs: Path, cfg: DictConfig) -> None:
    """Run one measurement stage with the settings ``cfg.expressivity`` and write its per-draw
    CSV, the draw-0 projections and a meta file (settings, profile, wall time, threads) into
    ``runs``. The profile's name is the run folder's suffix (``<preset>-<profile>``)."""
    import pandas as pd

    spec = OmegaConf.to_container(cfg.expressivity, resolve=True)
    runs = Path(runs)
    runs.mkdir(parents=True, exist_ok=True)
    fn = stage_depth if stage == "depth" else stage_cells
    t0 = time.time()
    rows, keep = fn(spec, spec["seed"])
    pd.DataFrame(rows).to_csv(runs / f"{stage}_draws.csv", index=False)
    torch.save(_project(keep), runs / f"{stage}_projections.pt")
    meta = {"profile": runs.name.rsplit("-", 1)[-1], **spec, "stage": stage,
            "wall_s": time.time() - t0,
            "n_draws": spec["deep_draws" if stage == "depth" else "draws"],
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "sigma_w2": SIGMA_W2, "sigma_b2": SIGMA_B2, "tau": CELL_TAU}
    (runs / f"{stage}_meta.json").write_text(json.dumps(meta, indent=2))


def depth_stage(runs: Path, results: Path, cfg: DictConfig) -> None:
    """The 6-layer FFN vs Neural ODE measurement (:func:`stage_depth`) into ``runs``."""
    _measure("depth", runs, cfg)


def cells_stage(runs: Path, results: Path, cfg: DictConfig) -> None:
    """The single-layer cells measurement (:func:`stage_cells`) into ``runs``."""
    _measure("cells", runs, cfg)


def report_stage(runs: Path, results: Path, profile: str) -> None:
    """The preset's report builder: :func:`report` from the stages' files in ``runs``."""
    report(Path(runs), Path(results))
