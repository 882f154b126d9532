"""Tables and figures of the ANODE reproduction, built only from the run folders.

Toys (``<runs>/toys/<task>_<model>_s<seed>/{summary.json, history.csv, features.pt}``):
``toys.md``/``toys.csv`` and per task ``toys_<task>_training.png`` (loss and NFE over training,
mean and min-max band over repeats), ``toys_<task>_nfe_vs_loss.png``, ``toys_<task>_features.png``
(h(1) of repeat 0), ``toys_g_1d_trajectories.png``. Images (``<runs>/images/*/summary.json``):
``images.md``/``images.csv``.
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from ..tables import mean_std

# What the paper (or a replication, reference.md section 2) says, shown beside the measurements.
TOY_CLAIMS = {
    ("g_1d", "node"): "cannot represent g (flow is order-preserving): maps -1 and 1 towards 0",
    ("g_1d", "anode1"): "represents g with one extra dimension",
    ("g_1d", "resnet"): "(discrete steps can cross: can represent g)",
    ("annulus", "node"): "loss plateaus, NFE grows during training",
    ("annulus", "anode1"): "near-zero loss, lower and steadier NFE",
    ("annulus", "anode2"): "near-zero loss, lower and steadier NFE",
    ("annulus", "anode5"): "near-zero loss, lower and steadier NFE (p = 5 best for d = 2)",
    ("annulus", "resnet"): "(fits the data; not an ODE)",
    ("annulus_wedge", "node"): "held-out accuracy 0.62 (replication)",
    ("annulus_wedge", "anode5"): "held-out accuracy 1.00 (replication)",
    ("annulus_wedge", "resnet"): "-",
}
TEST_SET = {"g_1d": "the points -1, 1", "annulus": "fresh sample of 3,000",
            "annulus_wedge": "held-out wedge [0, pi/5]"}
PAPER_IMAGES = {("mnist", "node_conv"): "96.4 ± 0.5", ("mnist", "anode_conv"): "98.2 ± 0.1",
                ("cifar10", "node_conv"): "53.7 ± 0.2", ("cifar10", "anode_conv"): "60.6 ± 0.4",
                ("svhn", "node_conv"): "81.0 ± 0.6", ("svhn", "anode_conv"): "83.5 ± 0.5"}
COLORS = {"node": "tab:red", "anode1": "tab:blue", "anode2": "tab:cyan", "anode5": "tab:green",
          "resnet": "tab:gray"}


def _mean_std(values: list[float], fmt: str = "{:.3f}") -> str:
    """nodebench.tables.mean_std with a str.format field (``"{:.3f}"``) as the format."""
    return mean_std(values, fmt[2:-1])


def _read_history(path: Path) -> dict[str, np.ndarray]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.array([float(r[k]) for r in rows]) for k in (rows[0] if rows else {})}


def _load_toys(root: Path) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = {}
    for f in sorted(root.glob("*/summary.json")):
        s = json.loads(f.read_text())
        s["dir"] = f.parent
        runs.setdefault((s["task"], s["model"]), []).append(s)
    order = list(TEST_SET) + sorted({t for t, _ in runs} - set(TEST_SET))
    return dict(sorted(runs.items(), key=lambda kv: (order.index(kv[0][0]),
                                                      list(COLORS).index(kv[0][1]))))


def _write_table(path_md: Path, path_csv: Path, header: list[str], rows: list[list],
                 preamble: str) -> None:
    lines = [preamble, "", "| " + " | ".join(header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    path_md.write_text("\n".join(lines) + "\n")
    with open(path_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def toy_table(runs: dict, out: Path, preamble: str) -> None:
    header = ["task", "model", "runs ok / failed", "final train loss (MSE)", "train accuracy",
              "test accuracy", "test set", "NFE-F epoch 1 -> last", "NFE-B epoch 1 -> last",
              "paper's claim"]
    rows = []
    for (task, model), ss in runs.items():
        ok = [s for s in ss if s["status"] == "ok"]
        failed = [s for s in ss if s["status"] != "ok"]
        rows.append([
            task, model, f"{len(ok)} / {len(failed)}",
            _mean_std([s["final_train_loss"] for s in ok], "{:.4f}"),
            _mean_std([s["train_accuracy"] for s in ok]),
            _mean_std([s["test_accuracy"] for s in ok]), TEST_SET[task],
            _nfe_cell(ok, "nfe_forward"), _nfe_cell(ok, "nfe_backward"),
            TOY_CLAIMS.get((task, model), "-")])
    _write_table(out / "toys.md", out / "toys.csv", header, rows, preamble)


def _nfe_cell(ok: list[dict], key: str) -> str:
    if not ok or ok[0]["model"] == "resnet":
        return "-"
    first = statistics.mean(s[f"{key}_first_epoch"] for s in ok)
    last = statistics.mean(s[f"{key}_last_epoch"] for s in ok)
    return f"{first:.1f} -> {last:.1f}"


def _band(ax, histories: list[dict], key: str, label: str, color: str, window: int) -> None:
    """Mean and min-max band over repeats of a per-iteration series, smoothed over ``window``."""
    n = min(len(h[key]) for h in histories)
    if n == 0:
        return
    kernel = np.ones(min(window, n)) / min(window, n)
    series = np.stack([np.convolve(h[key][:n], kernel, mode="valid") for h in histories])
    it = np.arange(series.shape[1]) + kernel.size
    ax.plot(it, series.mean(0), color=color, label=label)
    ax.fill_between(it, series.min(0), series.max(0), color=color, alpha=0.2)


def toy_figures(runs: dict, out: Path) -> None:
    tasks = sorted({t for t, _ in runs}, key=list(TEST_SET).index)
    for task in tasks:
        models = [(m, ss) for (t, m), ss in runs.items() if t == task]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        fig2, ax2 = plt.subplots(figsize=(5.5, 4))
        for model, ss in models:
            hs = [_read_history(s["dir"] / "history.csv") for s in ss]
            hs = [h for h in hs if h]
            if not hs:
                continue
            ok = sum(s["status"] == "ok" for s in ss)
            label = f"{model} ({ok}/{len(ss)} ok)"
            per_epoch = max(1, int(max(h["iteration"].size / h["epoch"].max() for h in hs)))
            _band(axes[0], hs, "loss", label, COLORS[model], per_epoch)
            if model != "resnet":
                _band(axes[1], hs, "nfe_forward", label, COLORS[model], per_epoch)
                _band(axes[2], hs, "nfe_backward", label, COLORS[model], per_epoch)
                for i, h in enumerate(hs):
                    ep = h["epoch"].astype(int)
                    loss = [h["loss"][ep == e].mean() for e in np.unique(ep)]
                    nfe = [h["nfe_forward"][ep == e].mean() for e in np.unique(ep)]
                    ax2.plot(nfe, loss, "o-", ms=3, color=COLORS[model], alpha=0.6,
                             label=model if i == 0 else None)
        for ax, title in zip(axes, ("train loss (MSE)", "NFE forward", "NFE backward (adjoint)")):
            ax.set_xlabel("iteration")
            ax.set_title(f"{task}: {title}")
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.suptitle("mean over repeats, band = min..max; smoothed over one epoch")
        fig.tight_layout()
        fig.savefig(out / f"toys_{task}_training.png", dpi=110)
        ax2.set_xlabel("NFE forward (epoch mean)")
        ax2.set_ylabel("train loss (epoch mean)")
        ax2.set_yscale("log")
        ax2.set_title(f"{task}: NFE vs loss, each point one epoch")
        ax2.legend(fontsize=8)
        fig2.tight_layout()
        fig2.savefig(out / f"toys_{task}_nfe_vs_loss.png", dpi=110)
        plt.close(fig)
        plt.close(fig2)
        _feature_figure(task, models, out)
    if any(t == "g_1d" for t, _ in runs):
        _trajectory_figure([(m, ss) for (t, m), ss in runs.items() if t == "g_1d"], out)


def _first_ok(ss: list[dict]) -> dict | None:
    ok = [s for s in ss if s["status"] == "ok" and (s["dir"] / "features.pt").exists()]
    return min(ok, key=lambda s: s["seed"]) if ok else None


def _feature_figure(task: str, models: list, out: Path) -> None:
    """h(1) of the lowest-seed successful run of each model, coloured by target."""
    fig = plt.figure(figsize=(4 * len(models), 4))
    for k, (model, ss) in enumerate(models):
        s = _first_ok(ss)
        dim = None if s is None else torch.load(s["dir"] / "features.pt")["features"].shape[1]
        ax = fig.add_subplot(1, len(models), k + 1, projection="3d" if dim and dim >= 3 else None)
        if s is None:
            ax.set_title(f"{model}: no successful run")
            continue
        f = torch.load(s["dir"] / "features.pt")
        for feats, y, marker, alpha in ((f["features"], f["y"], "o", 0.5),
                                        (f["test_features"], f["test_y"], "x", 0.9)):
            if task != "annulus_wedge" and marker == "x":
                continue
            c = np.where(y.flatten().numpy() > 0, "tab:orange", "tab:blue")
            pts = feats.numpy()
            cols = [pts[:, i] if i < pts.shape[1] else np.zeros(len(pts))
                    for i in range(min(max(pts.shape[1], 2), 3))]
            extra = {"depthshade": False} if len(cols) == 3 else {}
            ax.scatter(*cols, c=c, s=8, marker=marker, alpha=alpha, **extra)
        ax.set_title(f"{model} (seed {s['seed']}): h(1), dims {min(dim, 3)} of {dim}", fontsize=9)
    fig.suptitle(f"{task}: features at t = 1 (blue target -1, orange +1"
                 + ("; x = held-out wedge" if task == "annulus_wedge" else "") + ")")
    fig.tight_layout()
    fig.savefig(out / f"toys_{task}_features.png", dpi=110)
    plt.close(fig)


def _trajectory_figure(models: list, out: Path) -> None:
    """g_1d: the first coordinate of h(t) (ODE models) or of each block's state (ResNet)."""
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.5))
    for ax, (model, ss) in zip(np.atleast_1d(axes), models):
        s = _first_ok(ss)
        if s is None:
            ax.set_title(f"{model}: no successful run")
            continue
        f = torch.load(s["dir"] / "features.pt")
        traj, y = f["trajectory"].numpy(), f["y"][f["traj_index"]].flatten().numpy()
        t = np.linspace(0, 1, traj.shape[0]) if model != "resnet" else np.arange(traj.shape[0])
        for j in range(traj.shape[1]):
            ax.plot(t, traj[:, j, 0], color="tab:orange" if y[j] > 0 else "tab:blue", alpha=0.5)
        ax.set_xlabel("t" if model != "resnet" else "block")
        ax.set_ylabel("h(t)[0] (the output)")
        ax.set_title(f"{model} (seed {s['seed']})")
    fig.suptitle("g_1d: trajectories from x = -1 (orange, target +1) and x = 1 (blue, target -1)")
    fig.tight_layout()
    fig.savefig(out / "toys_g_1d_trajectories.png", dpi=110)
    plt.close(fig)


def image_table(root: Path, out: Path, preamble: str) -> None:
    runs: dict[tuple[str, str], list[dict]] = {}
    for f in sorted(root.glob("*/summary.json")):
        s = json.loads(f.read_text())
        runs.setdefault((s["dataset"], s["model"]), []).append(s)
    runs = dict(sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1] != "node_conv")))
    header = ["dataset", "model", "params", "filters + aug. channels", "seeds ok / failed",
              "test accuracy % (measured)", "paper accuracy % (5 runs)", "NFE-F / iter",
              "NFE-B / iter", "NFE eval / batch", "s / iteration"]
    rows = []
    for (dataset, model), ss in runs.items():
        ok = [s for s in ss if s["status"] == "ok"]
        m = ss[0]["config"]["model"]
        rows.append([
            dataset, model, f"{ss[0]['params']:,}", f"{m['filters']} + {m['augment_dim']}",
            f"{len(ok)} / {len(ss) - len(ok)}",
            _mean_std([100.0 - s["test_error"] for s in ok], "{:.1f}"),
            PAPER_IMAGES.get((dataset, model), "-"),
            _mean_std([s["nfe_forward"] for s in ok], "{:.1f}"),
            _mean_std([s["nfe_backward"] for s in ok], "{:.1f}"),
            _mean_std([s["nfe_eval"] for s in ok], "{:.1f}"),
            _mean_std([s["iter_s"] for s in ok], "{:.2f}")])
    _write_table(out / "images.md", out / "images.csv", header, rows, preamble)


def _stage_time(folder: Path) -> str:
    f = folder / "stage_time_s.txt"
    return f"{float(f.read_text()) / 60:.1f} min" if f.exists() else "unknown"


def report(runs: Path, results: Path, profile: str, description: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    device = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads available)"
    toys_root, images_root = runs / "toys", runs / "images"
    if toys_root.exists():
        toy_runs = _load_toys(toys_root)
        any_run = next(iter(toy_runs.values()))[0]
        tr = any_run["training"]
        pre = (f"# ANODE toys (Dupont et al. 2019), profile `{profile}`\n\n"
               f"Budget: {description}. Each run: {any_run['epochs']} epochs, batch "
               f"{tr['batch_size']}, Adam {tr['lr']:g}, loss {tr['loss']}, "
               f"{tr['solver']['method']} rtol=atol={tr['solver']['rtol']:g}, max_num_steps "
               f"{tr['solver']['max_num_steps']}, gradients {tr['gradient']}; repeats = seeds "
               f"0..{max(s['seed'] for ss in toy_runs.values() for s in ss)} (new data sample "
               f"and initialisation each). Device: {device}, one thread per run, CPU shared "
               f"with other jobs. Stage wall time {_stage_time(toys_root)}; sum of the runs' "
               f"wall times {sum(s['wall_time_s'] for ss in toy_runs.values() for s in ss) / 60:.0f}"
               f" min. Final loss = mean of the last epoch's "
               f"minibatch losses; accuracy = sign of the output vs the target, after training; "
               f"NFE per iteration, mean over the first and the last epoch. Failed runs "
               f"(e.g. max_num_steps exceeded) are counted, not dropped. Paper's epochs: 50, "
               f"repeats: 20 (authors' config 30 and 10).")
        toy_table(toy_runs, results, pre)
        toy_figures(toy_runs, results)
    if images_root.exists():
        summaries = list(images_root.glob("*/summary.json"))
        if summaries:
            s = json.loads(summaries[0].read_text())
            cfgt = s["config"]["trainer"]
            pre = (f"# ANODE image classification (Dupont et al. 2019, Section 5), profile "
                   f"`{profile}`\n\nBudget: {description}. Each run: {cfgt['epochs']} epoch(s), "
                   f"batch {cfgt['batch_size']}, {s['train_size']:,} training / "
                   f"{s['test_size']:,} test images, Adam 1e-3, {s['solver_desc']}, max_num_steps "
                   f"{s['config']['solver']['max_num_steps']}, gradients {s['gradient']}, no "
                   f"augmentation. Device: {s['device']}. Stage wall time "
                   f"{_stage_time(images_root)}. Accuracy: mean ± std over seeds at the last "
                   f"epoch. NFE per training iteration (mean over the last epoch). The paper's "
                   f"accuracies (second-hand, reference.md) are for its full budget and are not "
                   f"comparable with a budget this small.")
            image_table(images_root, results, pre)
