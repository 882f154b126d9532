"""The training loop: the one place where instruments meet the model.

``run(cfg, run_dir)`` trains ``cfg.model`` on ``cfg.dataset`` and writes, into ``run_dir``:
TensorBoard events (``train/loss``, ``train/nfe_forward``, ``train/nfe_backward``,
``eval/test_error``, ``memory/activation_mib``, ``time/iter_s``, ...), ``metrics.csv`` (one row per
epoch), ``model.pt`` (final weights) and ``summary.json`` (written last, atomically).

Runs survive interruption. At the end of every epoch ``checkpoint.pt`` is replaced atomically
(model, optimiser, scheduler, every RNG state including the data-shuffling generator, the metric
rows, the global step), so a kill at any moment leaves a whole checkpoint. ``run`` on a directory
that holds one resumes from it (same final metrics as an uninterrupted run, on CPU); on a
directory whose ``summary.json`` says ``ok`` it returns that summary without training; after a
failed run it starts again from scratch. ``trainer.resume: false`` always starts from scratch.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import config as C
from .errors import ConfigError, SolverFailure, classify_solver_error
from .implicit import STATS as IMPLICIT_STATS
from .instruments import ActivationMeter, NFECounter, Stopwatch
from .models.blocks import count_parameters

log = logging.getLogger("nodebench")

CHECKPOINT = "checkpoint.pt"
# Settings that may change between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = ("trainer.progress", "trainer.threads", "trainer.device", "trainer.resume",
                     "trainer.checkpoint", "trainer.log_every", "paths.data", "paths.runs")

METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_error", "test_error", "nfe_forward",
                 "nfe_backward", "nfe_eval", "implicit_iters_forward", "implicit_iters_backward",
                 "activation_mib", "cuda_max_mib", "iter_s",
                 "epoch_time_s", "eval_time_s", "iterations"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to ``<path>.tmp``, fsync, then ``os.replace``: a kill at any moment leaves
    either the previous checkpoint or the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_states(gen: torch.Generator) -> dict:
    """Every random stream training draws from: Python, NumPy, torch (CPU, CUDA) and ``gen``,
    the generator that shuffles the data and draws the crops."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "gen": gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict, gen: torch.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    gen.set_state(states["gen"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_changes(old: dict, new: dict) -> list[str]:
    """Keys (dotted) whose resolved values differ, except the ``RESUMABLE_CHANGES``."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys()
                  if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES))


def prepare_run_dir(run_dir: Path, config: dict, resume: bool) -> dict | None:
    """What a (re)started run finds in ``run_dir``: the finished summary (``status: ok``; the run
    is not repeated), the checkpoint to resume from, or nothing (outputs of a failed or
    abandoned run are removed first). Returns ``{"summary": ...}``, ``{"checkpoint": ...}`` or
    None. A checkpoint of another configuration is a ConfigError."""
    summary_path, ckpt_path = run_dir / "summary.json", run_dir / CHECKPOINT
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if resume and previous and previous.get("status") == "ok":
        return {"summary": previous}
    if resume and previous is None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        changed = config_changes(state["config"], config)
        if changed:
            raise ConfigError(f"{run_dir} holds a checkpoint of another configuration "
                              f"({', '.join(changed)} differ); use another hydra.run.dir or "
                              f"trainer.resume=false")
        return {"checkpoint": state}
    if previous is not None:
        log.info("previous run in %s %s (%s): starting again from scratch", run_dir,
                 previous.get("status"), previous.get("error"))
    outputs = [summary_path, ckpt_path, run_dir / "metrics.csv", run_dir / "model.pt",
               *run_dir.glob("events.out.tfevents.*")]
    for path in outputs:
        path.unlink(missing_ok=True)
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def evaluate(model: torch.nn.Module, data, batch_size: int, nfe: NFECounter) -> tuple[float, float]:
    """Test error (%) and mean NFE per evaluation batch."""
    model.eval()
    wrong, total, batches = 0, 0, 0
    with torch.no_grad(), nfe.phase_("eval"):
        for x, y in data.test_batches(batch_size):
            wrong += (model(x).argmax(1) != y).sum().item()
            total += y.numel()
            batches += 1
    return 100.0 * wrong / max(total, 1), nfe.take("eval") / max(batches, 1)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one configuration; return the summary (also written to ``run_dir/summary.json``).

    Raises ConfigError for bad input (before anything is written). Numerical failures of the
    solver end the run with ``status: failed`` and the reason.
    """
    C.validate(cfg)
    t = cfg.trainer
    config = OmegaConf.to_container(cfg, resolve=True)
    found = prepare_run_dir(run_dir, config, t.get("resume", True)) if run_dir.is_dir() else None
    if found and "summary" in found:
        log.info("%s already finished (summary.json status ok): not run again", run_dir)
        return found["summary"]
    state = found["checkpoint"] if found else None
    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(int(t.threads))
    seed_everything(cfg.seed, t.deterministic)

    data = C._call(cfg.dataset, "dataset").to(device)
    shape = cfg.dataset.shape
    model = C.build_model(cfg, shape.channels, shape.size, shape.classes).to(device)
    channels_last = bool(t.get("channels_last", False))
    if channels_last:  # a memory layout only: the same numbers, faster convolutions on some CPUs
        model = model.to(memory_format=torch.channels_last)
    n_batches = data.batches_per_epoch(t.batch_size)
    if t.max_batches:
        n_batches = min(n_batches, t.max_batches)
    if n_batches == 0:
        raise ConfigError(f"trainer.batch_size {t.batch_size} exceeds the "
                          f"{data.train_x.shape[0]} training images")
    optimizer, scheduler = C.build_optimizer(cfg, model, total_steps=t.epochs * n_batches)
    step_interval = cfg.optim.interval == "step"
    params = count_parameters(model)

    run_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only needed here

    nfe = NFECounter(model)
    meter = ActivationMeter(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    inst = t.instruments
    rows: list[dict] = []
    step, first_epoch, time_before, resumed_at = 0, 1, 0.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state["rng"], gen)  # after building the model, which drew from them
        rows, step, time_before = state["rows"], state["step"], state["wall_time_s"]
        first_epoch = state["epoch"] + 1
        resumed_at = [*state["resumed_at"], first_epoch]
        log.info("resuming from epoch %d/%d (checkpoint of epoch %d, step %d, in %s)",
                 first_epoch, t.epochs, state["epoch"], step, run_dir / CHECKPOINT)
    # purge_step: TensorBoard hides the events a killed epoch wrote after the checkpoint
    # (iteration steps > step); epoch-level scalars use the epoch number, always <= step.
    writer = SummaryWriter(str(run_dir), purge_step=step + 1 if state is not None else None)
    summary: dict[str, Any] = {
        "status": "running", "error": None, "model": cfg.model.name,
        "solver": cfg.solver.method if C.is_ode_model(cfg) else None,
        "solver_desc": C.build_solver(cfg).describe() if C.is_ode_model(cfg) else None,
        "gradient": C.build_gradient(cfg).describe() if C.is_ode_model(cfg) else None,
        "dataset": cfg.dataset.name, "train_size": int(data.train_x.shape[0]),
        "test_size": int(data.test_x.shape[0]), "seed": cfg.seed, "params": params,
        "device": device_name(device), "experiment": cfg.experiment,
        "config": config, "resumed_at_epochs": resumed_at,
        "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "load_start": list(os.getloadavg()),
    }
    log.info("%s: %s params on %s, %d train / %d test images", cfg.model.name, f"{params:,}",
             summary["device"], summary["train_size"], summary["test_size"])
    started = time.perf_counter()
    run_iters = dict.fromkeys(IMPLICIT_STATS.KEYS, 0)  # this session's, training + evaluation
    try:
        for epoch in range(first_epoch, t.epochs + 1):
            model.train()
            clock = Stopwatch(device)
            sums = {"loss": 0.0, "wrong": 0, "seen": 0, "nfe_f": 0, "nfe_b": 0, "mem": 0.0,
                    "iter_s": 0.0}
            epoch_iters = dict.fromkeys(IMPLICIT_STATS.KEYS, 0)
            IMPLICIT_STATS.take()
            bar = tqdm(total=n_batches, desc=f"{cfg.model.name} epoch {epoch}/{t.epochs}",
                       disable=not t.progress, leave=False, dynamic_ncols=True,
                       mininterval=0.1 if sys.stderr.isatty() else 5.0)
            for i, (x, y) in enumerate(data.train_batches(t.batch_size, gen)):
                if i >= n_batches:
                    break
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                measure_mem = inst.memory and i % inst.memory_every == 0
                with nfe.phase_("forward"):
                    if measure_mem:
                        with meter.measure(device):
                            logits = model(x)
                            loss = torch.nn.functional.cross_entropy(logits, y)
                    else:
                        logits = model(x)
                        loss = torch.nn.functional.cross_entropy(logits, y)
                loss_value = loss.item()  # a sync point; needed to stop on a NaN at once
                if not math.isfinite(loss_value):
                    raise SolverFailure(f"non-finite loss ({loss_value}) at epoch {epoch}, "
                                        f"iteration {i}")
                optimizer.zero_grad(set_to_none=True)
                with nfe.phase_("backward"):
                    loss.backward()
                optimizer.step()
                if step_interval:
                    scheduler.step()
                iter_s = clock.lap()
                nf, nb = nfe.take("forward"), nfe.take("backward")
                its = IMPLICIT_STATS.take()  # fixed-point iterations of the implicit solvers
                for key, value in its.items():
                    epoch_iters[key] += value
                    run_iters[key] += value
                wrong = (logits.argmax(1) != y).sum().item()
                sums["loss"] += loss_value * y.numel()
                sums["wrong"] += wrong
                sums["seen"] += y.numel()
                sums["nfe_f"] += nf
                sums["nfe_b"] += nb
                sums["iter_s"] += iter_s
                if measure_mem:
                    sums["mem"] = max(sums["mem"], meter.last_mib)
                step += 1
                if step % t.log_every == 0:
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("time/iter_s", iter_s, step)
                    if nfe.active:
                        writer.add_scalar("train/nfe_forward", nf, step)
                        writer.add_scalar("train/nfe_backward", nb, step)
                    for phase in ("forward", "backward"):
                        if its[f"{phase}_steps"]:
                            writer.add_scalar(f"train/implicit_iters_{phase}",
                                              its[f"{phase}_iters"] / its[f"{phase}_steps"], step)
                    if measure_mem:
                        writer.add_scalar("memory/activation_mib", meter.last_mib, step)
                bar.set_postfix(loss=f"{loss_value:.3f}", nfe=f"{nf}/{nb}", refresh=False)
                bar.update()
            bar.close()
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None and not step_interval:
                scheduler.step()
            train_time = sums["iter_s"]
            eval_clock = Stopwatch(device)
            test_error, nfe_eval = evaluate(model, data, t.eval_batch_size, nfe)
            eval_s = eval_clock.lap()
            for key, value in IMPLICIT_STATS.take().items():  # evaluation: forward solves only
                run_iters[key] += value
            row = {
                "epoch": epoch, "lr": lr, "train_loss": sums["loss"] / max(sums["seen"], 1),
                "train_error": 100.0 * sums["wrong"] / max(sums["seen"], 1),
                "test_error": test_error,
                "nfe_forward": sums["nfe_f"] / n_batches, "nfe_backward": sums["nfe_b"] / n_batches,
                "nfe_eval": nfe_eval,
                "implicit_iters_forward": _per_step(epoch_iters, "forward"),
                "implicit_iters_backward": _per_step(epoch_iters, "backward"),
                "activation_mib": sums["mem"] if inst.memory else None,
                "cuda_max_mib": meter.cuda_max_mib, "iter_s": train_time / n_batches,
                "epoch_time_s": train_time, "eval_time_s": eval_s, "iterations": n_batches,
            }
            rows.append(row)
            _write_metrics(run_dir / "metrics.csv", rows)
            for key in ("train_loss", "train_error", "nfe_forward", "nfe_backward"):
                writer.add_scalar(f"epoch/{key}", row[key], epoch)
            writer.add_scalar("eval/test_error", test_error, epoch)
            writer.add_scalar("eval/nfe", nfe_eval, epoch)
            writer.add_scalar("train/lr", lr, epoch)
            writer.add_scalar("time/epoch_s", train_time, epoch)
            if inst.memory:
                writer.add_scalar("epoch/activation_mib", row["activation_mib"], epoch)
            log.info("epoch %d/%d  loss %.4f  test error %.2f%%  NFE f/b %.1f/%.1f  "
                     "mem %.1f MiB  %.1f s", epoch, t.epochs, row["train_loss"], test_error,
                     row["nfe_forward"], row["nfe_backward"], row["activation_mib"] or 0.0,
                     train_time)
            if t.get("checkpoint", True):
                save_checkpoint(run_dir / CHECKPOINT, {
                    "epoch": epoch, "step": step, "rows": rows, "config": config,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_states(gen), "resumed_at": resumed_at,
                    "wall_time_s": time_before + time.perf_counter() - started})
        summary["status"] = "ok"
    except Exception as exc:  # numerical failures are recorded, bugs re-raised
        reason = classify_solver_error(exc)
        if reason is None:
            raise
        summary.update(status="failed", error=reason)
        log.error("run failed: %s", reason)
    finally:
        nfe.remove()
    summary.update(_final_metrics(rows))
    summary["implicit_iterations"] = run_iters if any(run_iters.values()) else None
    summary["wall_time_s"] = time_before + time.perf_counter() - started
    summary["epochs_done"] = len(rows)
    summary["load_end"] = list(os.getloadavg())
    summary["contended"] = contended(summary)
    if t.save_model and summary["status"] == "ok":
        torch.save(model.state_dict(), run_dir / "model.pt")
    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
               for k, v in summary.items() if k in ("model", "solver", "gradient", "dataset",
                                                      "seed", "params", "status")}
    final = {f"hparam/{k}": summary[k] for k in ("test_error", "nfe_forward")
             if isinstance(summary.get(k), (int, float))}
    writer.add_hparams(hparams, final, run_name=".")
    writer.close()
    write_json_atomic(run_dir / "summary.json", summary)
    # finished (ok: never rerun; failed: rerun from scratch), so the checkpoint has done its job
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return summary


def contended(summary: dict) -> bool:
    """True when the 1-minute load average at the start or the end of the run exceeded the
    number of cores plus 0.5 (the limit of ``shared/tools/quiet-run``): its timings were taken
    while something else computed, and the report marks them."""
    cores = summary.get("cores") or os.cpu_count() or 1
    loads = [summary.get("load_start"), summary.get("load_end")]
    return any(load is not None and load[0] > cores + 0.5 for load in loads)


def _per_step(counts: dict[str, int], phase: str) -> float | None:
    """Mean fixed-point iterations per implicit step of ``phase``; None without implicit steps."""
    steps = counts[f"{phase}_steps"]
    return counts[f"{phase}_iters"] / steps if steps else None


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _final_metrics(rows: list[dict]) -> dict:
    if not rows:
        return {k: None for k in ("test_error", "best_test_error", "best_epoch", "nfe_forward",
                                  "nfe_backward", "nfe_eval", "activation_mib", "epoch_time_s",
                                  "iter_s", "cuda_max_mib", "iterations")}
    last = rows[-1]
    best = min(rows, key=lambda r: r["test_error"])
    return {
        "test_error": last["test_error"], "best_test_error": best["test_error"],
        "best_epoch": best["epoch"], "nfe_forward": last["nfe_forward"],
        "nfe_backward": last["nfe_backward"], "nfe_eval": last["nfe_eval"],
        "activation_mib": max((r["activation_mib"] or 0.0) for r in rows) or None,
        "cuda_max_mib": last["cuda_max_mib"],
        "epoch_time_s": sum(r["epoch_time_s"] for r in rows) / len(rows),
        "iter_s": sum(r["iter_s"] for r in rows) / len(rows),
        "iterations": sum(r["iterations"] for r in rows),
    }


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_steps: int = 0, final_fraction: float = 0.0):
    """Per-iteration cosine decay of the learning rate to ``final_fraction`` of its start.

    For short CPU budgets (a few epochs), where the paper's steps at epochs 60/100/140 never
    arrive; optional linear warm-up over ``warmup_steps``.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
