"""The training loop: the one place where instruments meet the model.

``run(cfg, run_dir)`` trains ``cfg.model`` on ``cfg.dataset`` and writes, into ``run_dir``:
TensorBoard events (``train/loss``, ``train/nfe_forward``, ``train/nfe_backward``,
``eval/test_error``, ``memory/activation_mib``, ``time/iter_s``, ...), ``metrics.csv`` (one row per
epoch), ``model.pt`` (final weights) and ``summary.json`` (written last, atomically).

Penalties (RNODE, TayNODE; :mod:`nodebench.regularisers`): after the task's loss, the terms that
the model's modules left in ``pending_penalties`` during the forward pass
(:func:`nodebench.regularisers.take_penalties`) are added to the loss that is back-propagated;
``train_loss`` stays the task's loss. Their batch means go to TensorBoard
(``train/penalty_<name>``), to metrics.csv as ``penalty_<name>`` columns (epoch means; only in runs
that have penalties) and to summary.json (the last epoch's).

Runs survive interruption. At the end of every epoch ``checkpoint.pt`` is replaced atomically
(model, optimiser, scheduler, every RNG state including the data-shuffling generator, the metric
rows, the global step; tensors, plain types and the config as JSON, read back with
``torch.load(weights_only=True)``), so a kill at any moment leaves a whole checkpoint. ``run`` on
a directory that holds one resumes from it (same final metrics as an uninterrupted run, on CPU);
on a directory whose ``summary.json`` says ``ok`` it returns that summary without training; after a
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
from .instruments import (
    ActivationMeter,
    NFECounter,
    StepCounter,
    Stopwatch,
    merge_steps,
    steps_done,
)
from .models.blocks import count_parameters
from .regularisers import take_penalties
from .validity import (
    DEFAULT_THRESHOLD,
    gradient_error_of,
    model_validity,
    ode_blocks,
    solve_modules,
)

log = logging.getLogger("nodebench")

CHECKPOINT = "checkpoint.pt"
# Settings that may change between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = ("trainer.progress", "trainer.threads", "trainer.device", "trainer.resume",
                     "trainer.checkpoint", "trainer.log_every", "paths.data", "paths.runs",
                     "dataset.root", "reproduce")  # where the (md5-checked) data sits does not change results

# metrics.csv columns of a classification run; other tasks put their own columns in place of
# train_error and test_error (metric_fields)
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_error", "test_error", "nfe_forward",
                 "nfe_backward", "nfe_eval", "implicit_iters_forward", "implicit_iters_backward",
                 "activation_mib", "cuda_max_mib", "iter_s",
                 "epoch_time_s", "eval_time_s", "iterations",
                 # issue 13: step statistics (per training iteration / evaluation batch), stiffness
                 # signs of the forward training solves, validity checks of the fixed batch
                 "steps_accepted_forward", "steps_rejected_forward", "steps_accepted_backward",
                 "steps_rejected_backward", "steps_accepted_eval", "steps_rejected_eval",
                 "min_step", "rejected_fraction", "validity_reference_error",
                 "validity_roundtrip_error", "valid", "validity_time_s"]
STEP_FIELDS = METRIC_FIELDS[METRIC_FIELDS.index("steps_accepted_forward"):
                            METRIC_FIELDS.index("validity_reference_error")]
VALIDITY_FIELDS = METRIC_FIELDS[METRIC_FIELDS.index("validity_reference_error"):]
COMMON_FIELDS = METRIC_FIELDS[METRIC_FIELDS.index("nfe_forward"):]


def metric_fields(task) -> list[str]:
    """The metrics.csv columns of a run of ``task``: epoch, lr, train_loss, the task's training
    and evaluation columns, then the instruments' columns (the same for every task)."""
    return ["epoch", "lr", "train_loss", *task.train_columns, *task.eval_columns, *COMMON_FIELDS]


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


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``
    (tensors and plain types only: a crafted pickle cannot run code).

    Raises ConfigError naming the file when it cannot be read that way (corrupt, truncated, not
    nodebench's, or holding arbitrary objects).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "config_json" not in state:
            raise ValueError("not a nodebench checkpoint (no config_json)")
        state["config"] = json.loads(state["config_json"])
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the same user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load {path} safely (weights_only): {first[:200]}; remove it or "
                          f"use trainer.resume=false") from None
    return state


def rng_states(gen: torch.Generator) -> dict:
    """Every random stream training draws from: Python, NumPy, torch (CPU, CUDA) and ``gen``,
    the generator that shuffles the data and draws the crops; as tensors and plain types, so that
    ``torch.load(weights_only=True)`` reads them back."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": {"version": int(py_version),
                       "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss": py_gauss},
            "numpy": {"name": str(np_name),
                      "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                      "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                      "gauss": float(np_gauss)},
            "torch": torch.get_rng_state(), "gen": gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict, gen: torch.Generator) -> None:
    """Restore the streams saved by :func:`rng_states`."""
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = states["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
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


def read_summary(path: Path) -> dict | None:
    """``summary.json`` as a dict, None if absent; ConfigError naming it if it is unreadable."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004 - caught below
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; remove it or use another "
                          f"hydra.run.dir") from None
    return data


def check_existing_run(run_dir: Path, config: dict, resume: bool = True) -> None:
    """Refuse to run ``config`` in a folder that holds a finished run (``status: ok``) or a
    checkpoint of another configuration: the folder would contradict its own records.

    Called by the CLI before Hydra writes ``.hydra/`` and again by :func:`prepare_run_dir`.
    Raises ConfigError naming the settings that differ.
    """
    run_dir = Path(run_dir)
    if not resume or not run_dir.is_dir():
        return
    previous = read_summary(run_dir / "summary.json")
    if previous is not None:
        if previous.get("status") != "ok" or not isinstance(previous.get("config"), dict):
            return  # failed or abandoned: it is started again from scratch
        changed = config_changes(previous["config"], config)
        if changed:
            raise ConfigError(f"{run_dir} holds a finished run of another configuration "
                              f"({', '.join(changed)} differ); use another hydra.run.dir")
        return
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        changed = config_changes(load_checkpoint(ckpt_path)["config"], config)
        if changed:
            raise ConfigError(f"{run_dir} holds a checkpoint of another configuration "
                              f"({', '.join(changed)} differ); use another hydra.run.dir or "
                              f"trainer.resume=false")


def prepare_run_dir(run_dir: Path, config: dict, resume: bool) -> dict | None:
    """What a (re)started run finds in ``run_dir``: the finished summary (``status: ok``; the run
    is not repeated), the checkpoint to resume from, or nothing (outputs of a failed or
    abandoned run are removed first). Returns ``{"summary": ...}``, ``{"checkpoint": ...}`` or
    None. A finished run or a checkpoint of another configuration is a ConfigError (raised
    before anything in ``run_dir`` is changed)."""
    summary_path, ckpt_path = run_dir / "summary.json", run_dir / CHECKPOINT
    check_existing_run(run_dir, config, resume)
    previous = read_summary(summary_path)
    if resume and previous and previous.get("status") == "ok":
        return {"summary": previous}
    if resume and previous is None and ckpt_path.exists():
        return {"checkpoint": load_checkpoint(ckpt_path)}
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


def evaluate(model: torch.nn.Module, task, batch_size: int,
             nfe: NFECounter) -> tuple[dict, float | None, int]:
    """The task's evaluation metrics, the mean NFE per evaluation batch (None when not counted)
    and the number of evaluation batches."""
    model.eval()
    with torch.no_grad(), nfe.phase_("eval"):
        metrics, batches = task.evaluate(model, batch_size)
    nfe_eval = nfe.take("eval") / max(batches, 1) if nfe.counting else None
    return metrics, nfe_eval, batches


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
        log.info("%s already finished (summary.json status ok): not run again",
                 run_dir.resolve())
        return found["summary"]
    log.info("run folder: %s", run_dir.resolve())
    state = found["checkpoint"] if found else None
    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(int(t.threads))
    seed_everything(cfg.seed, t.deterministic)

    task = C.build_task(cfg).to(device)
    model = C.build_model(cfg, inputs=C.model_inputs(cfg)).to(device)
    channels_last = bool(t.get("channels_last", False)) and hasattr(task, "channels_last")
    if channels_last:  # a memory layout only: the same numbers, faster convolutions on some CPUs
        model = model.to(memory_format=torch.channels_last)
    fields = metric_fields(task)
    n_batches = task.batches_per_epoch(t.batch_size)
    if t.max_batches:
        n_batches = min(n_batches, t.max_batches)
    if n_batches == 0:
        raise ConfigError(f"trainer.batch_size {t.batch_size} exceeds the "
                          f"{task.train_size} training {task.unit}")
    eval_every = int(t.get("eval_every", 1))
    validity_every = int((t.get("instruments") or {}).get("validity_every", 1))
    optimizer, scheduler = C.build_optimizer(cfg, model, total_steps=t.epochs * n_batches)
    step_interval = cfg.optim.interval == "step"
    params = count_parameters(model)
    # Gradient error at initialisation: the weights as built (before a checkpoint is loaded, so a
    # resumed run measures the same initial weights; no random numbers are drawn).
    grad_init = _gradient_check(model, task, t.instruments)

    run_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only needed here

    nfe = NFECounter(model, count=bool(t.instruments.get("nfe", True)))
    meter = ActivationMeter(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    inst = t.instruments
    # accepted/rejected steps of every solve, in the phases the NFE counter is switched to
    steps = StepCounter(model, phases=nfe) if inst.get("steps", True) else None
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
        "dataset": cfg.dataset.name, "task": task.name, "train_size": task.train_size,
        "test_size": task.test_size, "seed": cfg.seed, "params": params,
        "device": device_name(device), "experiment": cfg.group,
        "config": config, "resumed_at_epochs": resumed_at,
        "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "load_start": list(os.getloadavg()),
    }
    log.info("%s: %s params on %s, %d train / %d test %s", cfg.model.name, f"{params:,}",
             summary["device"], summary["train_size"], summary["test_size"], task.unit)
    started = time.perf_counter()
    run_iters = dict.fromkeys(IMPLICIT_STATS.KEYS, 0)  # this session's, training + evaluation
    try:
        for epoch in range(first_epoch, t.epochs + 1):
            model.train()
            clock = Stopwatch(device)
            sums = {"loss": 0.0, "seen": 0, "nfe_f": 0, "nfe_b": 0, "mem": 0.0, "iter_s": 0.0}
            counts: dict[str, float] = {}  # the task's sums behind its training columns
            pen_sums: dict[str, float] = {}  # penalty batch means, weighted by samples seen
            epoch_iters = dict.fromkeys(IMPLICIT_STATS.KEYS, 0)
            epoch_steps: dict[str, dict] = {"forward": {}, "backward": {}}
            IMPLICIT_STATS.take()
            bar = tqdm(total=n_batches, desc=f"{cfg.model.name} epoch {epoch}/{t.epochs}",
                       disable=not t.progress, leave=False, dynamic_ncols=True,
                       mininterval=0.1 if sys.stderr.isatty() else 5.0)
            for i, batch in enumerate(task.train_batches(t.batch_size, gen)):
                if i >= n_batches:
                    break
                if channels_last:
                    batch = task.channels_last(batch)
                measure_mem = inst.memory and i % inst.memory_every == 0
                with nfe.phase_("forward"):
                    if measure_mem:
                        with meter.measure(device):
                            loss, out = task.loss(model, batch)
                            penalty, penalty_values = take_penalties(model)
                    else:
                        loss, out = task.loss(model, batch)
                        penalty, penalty_values = take_penalties(model)
                loss_value = loss.item()  # a sync point; needed to stop on a NaN at once
                if not math.isfinite(loss_value):
                    raise SolverFailure(f"non-finite loss ({loss_value}) at epoch {epoch}, "
                                        f"iteration {i}")
                if penalty is not None:  # RNODE / TayNODE terms; train_loss stays the task's
                    bad = [k for k, v in penalty_values.items() if not math.isfinite(v)]
                    if bad:
                        raise SolverFailure(f"non-finite penalty {', '.join(bad)} at epoch "
                                            f"{epoch}, iteration {i}")
                    loss = loss + penalty
                optimizer.zero_grad(set_to_none=True)
                with nfe.phase_("backward"):
                    loss.backward()
                if not _finite_gradients(model):  # one sync; stop before the update spreads it
                    raise SolverFailure(f"non-finite gradient at epoch {epoch}, iteration {i}")
                optimizer.step()
                if step_interval:
                    scheduler.step()
                iter_s = clock.lap()
                nf, nb = nfe.take("forward"), nfe.take("backward")
                if steps is not None:  # this iteration's steps; the adjoint's are in backward
                    sf, sb = steps.take("forward"), steps.take("backward")
                    merge_steps(epoch_steps["forward"], sf)
                    merge_steps(epoch_steps["backward"], sb)
                its = IMPLICIT_STATS.take()  # fixed-point iterations of the implicit solvers
                for key, value in its.items():
                    epoch_iters[key] += value
                    run_iters[key] += value
                counted = task.count(batch, out)
                sums["loss"] += loss_value * counted["seen"]
                for key, value in counted.items():
                    counts[key] = counts.get(key, 0) + value
                sums["seen"] += counted["seen"]
                for name, value in penalty_values.items():
                    pen_sums[name] = pen_sums.get(name, 0.0) + value * counted["seen"]
                sums["nfe_f"] += nf
                sums["nfe_b"] += nb
                sums["iter_s"] += iter_s
                if measure_mem:
                    sums["mem"] = max(sums["mem"], meter.last_mib)
                step += 1
                if step % t.log_every == 0:
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("time/iter_s", iter_s, step)
                    for name, value in penalty_values.items():
                        writer.add_scalar(f"train/penalty_{name}", value, step)
                    if nfe.active and nfe.counting:
                        writer.add_scalar("train/nfe_forward", nf, step)
                        writer.add_scalar("train/nfe_backward", nb, step)
                    if steps is not None and steps.active:
                        for phase, taken in (("forward", sf), ("backward", sb)):
                            writer.add_scalar(f"train/steps_accepted_{phase}", steps_done(taken),
                                              step)
                            writer.add_scalar(f"train/steps_rejected_{phase}", taken["rejected"],
                                              step)
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
            evaluated = epoch % eval_every == 0 or epoch == t.epochs
            if evaluated:  # trainer.eval_every: the columns stay empty in the other epochs
                scores, nfe_eval, eval_batches = evaluate(model, task, t.eval_batch_size, nfe)
            else:
                scores, nfe_eval, eval_batches = {}, None, 0
            eval_s = eval_clock.lap()
            for key, value in IMPLICIT_STATS.take().items():  # evaluation: forward solves only
                run_iters[key] += value
            row = {
                "epoch": epoch, "lr": lr, "train_loss": sums["loss"] / max(sums["seen"], 1),
                **task.train_stats(counts),
                **{key: scores.get(key) for key in task.eval_columns},
                "nfe_forward": sums["nfe_f"] / n_batches if nfe.counting else None,
                "nfe_backward": sums["nfe_b"] / n_batches if nfe.counting else None,
                "nfe_eval": nfe_eval,
                "implicit_iters_forward": _per_step(epoch_iters, "forward"),
                "implicit_iters_backward": _per_step(epoch_iters, "backward"),
                "activation_mib": sums["mem"] if inst.memory else None,
                "cuda_max_mib": meter.cuda_max_mib, "iter_s": train_time / n_batches,
                "epoch_time_s": train_time, "eval_time_s": eval_s, "iterations": n_batches,
            }
            row.update(_step_columns(epoch_steps if steps is not None else None,
                                     steps.take("eval") if steps is not None else None,
                                     n_batches, eval_batches))
            # trainer.instruments.validity_every: check every N epochs and after the last
            if epoch % validity_every == 0 or epoch == t.epochs:
                row.update(_validity_check(model, task, inst))  # outside any phase: not counted
            else:
                row.update(dict.fromkeys(VALIDITY_FIELDS))
            row.update({f"penalty_{name}": value / max(sums["seen"], 1)
                        for name, value in pen_sums.items()})
            rows.append(row)
            _write_metrics(run_dir / "metrics.csv", rows, fields + penalty_fields(rows))
            for key in ("train_loss", *task.train_columns, "nfe_forward", "nfe_backward"):
                if row[key] is not None:
                    writer.add_scalar(f"epoch/{key}", row[key], epoch)
            for key in penalty_fields([row]):
                writer.add_scalar(f"epoch/{key}", row[key], epoch)
            for key in task.eval_columns:
                if row[key] is not None:
                    writer.add_scalar(f"eval/{key}", row[key], epoch)
            if nfe_eval is not None:
                writer.add_scalar("eval/nfe", nfe_eval, epoch)
            writer.add_scalar("train/lr", lr, epoch)
            writer.add_scalar("time/epoch_s", train_time, epoch)
            if inst.memory:
                writer.add_scalar("epoch/activation_mib", row["activation_mib"], epoch)
            for key, tag in (("steps_accepted_forward", "epoch/steps_accepted_forward"),
                             ("steps_rejected_forward", "epoch/steps_rejected_forward"),
                             ("steps_accepted_backward", "epoch/steps_accepted_backward"),
                             ("steps_rejected_backward", "epoch/steps_rejected_backward"),
                             ("steps_accepted_eval", "eval/steps_accepted"),
                             ("steps_rejected_eval", "eval/steps_rejected"),
                             ("min_step", "epoch/min_step"),
                             ("rejected_fraction", "epoch/rejected_fraction"),
                             ("validity_reference_error", "eval/validity_reference_error"),
                             ("validity_roundtrip_error", "eval/validity_roundtrip_error"),
                             ("valid", "eval/valid")):
                if row.get(key) is not None:
                    writer.add_scalar(tag, float(row[key]), epoch)
            if row.get("valid") is not None:
                log.info("epoch %d/%d  solve %s: reference error %s, round trip %s (threshold %g)",
                         epoch, t.epochs, "valid" if row["valid"] else "NOT valid",
                         _fmt(row["validity_reference_error"]),
                         _fmt(row["validity_roundtrip_error"]),
                         inst.get("validity_threshold", DEFAULT_THRESHOLD))
            mem = row["activation_mib"]  # None when the memory meter is off
            log.info("epoch %d/%d  loss %.4f  %s  NFE f/b %.1f/%.1f  mem %s  %.1f s",
                     epoch, t.epochs, row["train_loss"], _score_text(task, row),
                     row["nfe_forward"] or 0.0, row["nfe_backward"] or 0.0,
                     "off" if mem is None else f"{mem:.1f} MiB", train_time)
            if t.get("checkpoint", True):
                save_checkpoint(run_dir / CHECKPOINT, {
                    "epoch": epoch, "step": step, "rows": _plain_rows(rows),
                    "config_json": json.dumps(config, sort_keys=True),
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
    summary.update(_final_metrics(rows, task))
    summary.update({key: rows[-1].get(key) for key in penalty_fields(rows)})
    if steps is not None:
        steps.remove()
    summary["validity_threshold"] = (float(inst.get("validity_threshold", DEFAULT_THRESHOLD))
                                     if inst.get("validity", True) else None)
    summary.update(_grad_fields("init", grad_init))
    summary.update(_grad_fields("final", _gradient_check(model, task, inst)
                                if summary["status"] == "ok" else None))
    summary["implicit_iterations"] = run_iters if any(run_iters.values()) else None
    summary["wall_time_s"] = time_before + time.perf_counter() - started
    summary["epochs_done"] = len(rows)
    summary["load_end"] = list(os.getloadavg())
    summary["contended"] = contended(summary)
    if t.save_model and summary["status"] == "ok":
        torch.save(model.state_dict(), run_dir / "model.pt")
    if summary["status"] == "ok":
        model.eval()
        task.save_artifacts(model, run_dir)  # what the report draws (toys, dynamics, latent)
    # the full solver description (method, tolerances or step size) and gradient mode; '-' for
    # models without an ODE block (never the string 'None')
    hparams = {"model": summary["model"], "solver": summary["solver_desc"] or "-",
               "gradient": summary["gradient"] or "-", "dataset": summary["dataset"],
               "seed": summary["seed"], "params": summary["params"], "status": summary["status"]}
    final = {f"hparam/{k}": summary[k] for k in (task.target, "nfe_forward")
             if isinstance(summary.get(k), (int, float))}
    writer.add_hparams(hparams, final, run_name=".")
    writer.close()
    write_json_atomic(run_dir / "summary.json", summary)
    # finished (ok: never rerun; failed: rerun from scratch), so the checkpoint has done its job
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    log.info("run %s; results in %s", summary["status"], run_dir.resolve())
    return summary


def contended(summary: dict) -> bool:
    """True when the 1-minute load average at the start or the end of the run exceeded the
    number of cores plus 0.5 (the limit of ``shared/tools/quiet-run``): its timings were taken
    while something else computed, and the report marks them."""
    cores = summary.get("cores") or os.cpu_count() or 1
    loads = [summary.get("load_start"), summary.get("load_end")]
    return any(load is not None and load[0] > cores + 0.5 for load in loads)


def penalty_fields(rows: list[dict]) -> list[str]:
    """The ``penalty_<name>`` columns of ``rows``, in the order they first appear (none in a run
    without penalties, whose metrics.csv keeps exactly the columns of :func:`metric_fields`)."""
    found: list[str] = []
    for row in rows:
        found += [k for k in row if k.startswith("penalty_") and k not in found]
    return found


def _per_step(counts: dict[str, int], phase: str) -> float | None:
    """Mean fixed-point iterations per implicit step of ``phase``; None without implicit steps."""
    steps = counts[f"{phase}_steps"]
    return counts[f"{phase}_iters"] / steps if steps else None


def _finite_gradients(model: torch.nn.Module) -> bool:
    """True when every parameter gradient is finite (one device sync for all of them)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _plain(value: Any) -> Any:
    """A metric value as a plain Python type (``torch.load(weights_only=True)`` reads those)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # 0-d tensor, NumPy scalar
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _plain_rows(rows: list[dict]) -> list[dict]:
    return [{str(k): _plain(v) for k, v in row.items()} for row in rows]


def _write_metrics(path: Path, rows: list[dict], fields: list[str] = METRIC_FIELDS) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _final_metrics(rows: list[dict], task) -> dict:
    """Summary fields from the epoch rows: the last evaluation's values (the last epoch's step
    statistics and validity), the best (lowest) value of the task's target column
    (``best_<target>``, e.g. ``best_test_error``) and its epoch, means of the timings."""
    target = task.target
    if not rows:
        return {k: None for k in (*task.eval_columns, "train_loss", f"best_{target}", "best_epoch",
                                  "nfe_forward", "nfe_backward", "nfe_eval", "activation_mib",
                                  "epoch_time_s", "iter_s", "cuda_max_mib", "iterations",
                                  *STEP_FIELDS, *VALIDITY_FIELDS)}
    last = rows[-1]
    scored = [r for r in rows if r.get(target) is not None]
    best = min(scored, key=lambda r: r[target]) if scored else {target: None, "epoch": None}
    check_s = [r["validity_time_s"] for r in rows if r.get("validity_time_s") is not None]
    return {
        **{key: last.get(key) for key in task.eval_columns},
        "train_loss": last["train_loss"],
        f"best_{target}": best[target],
        "best_epoch": best["epoch"], "nfe_forward": last["nfe_forward"],
        "nfe_backward": last["nfe_backward"], "nfe_eval": last["nfe_eval"],
        "activation_mib": max((r["activation_mib"] or 0.0) for r in rows) or None,
        "cuda_max_mib": last["cuda_max_mib"],
        "epoch_time_s": sum(r["epoch_time_s"] for r in rows) / len(rows),
        "iter_s": sum(r["iter_s"] for r in rows) / len(rows),
        "iterations": sum(r["iterations"] for r in rows),
        **{k: last.get(k) for k in STEP_FIELDS + VALIDITY_FIELDS},
        "validity_time_s": sum(check_s) / len(check_s) if check_s else None,  # mean per epoch
    }


def _fmt(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2e}"


def _score_text(task, row: dict) -> str:
    """The evaluation columns of an epoch row for the log line ('not evaluated' when skipped)."""
    if row.get(task.target) is None:
        return "not evaluated"
    if task.target == "test_error":
        return f"test error {row['test_error']:.2f}%"
    return "  ".join(f"{key} {row[key]:.4g}" for key in task.eval_columns
                     if row.get(key) is not None)


def _step_columns(train: dict[str, dict] | None, evals: dict | None, n_batches: int,
                  eval_batches: int) -> dict:
    """One epoch's step statistics (issue 13) for metrics.csv, from :class:`StepCounter` counts.

    ``steps_accepted_*`` / ``steps_rejected_*``: mean steps per training iteration (forward
    solves, the adjoint's backward solves) or per evaluation batch; a fixed-grid step counts as
    accepted. Stiffness signs of the forward training solves: ``min_step``, the smallest accepted
    step of the epoch (units of the ODE's time), and ``rejected_fraction`` = rejected /
    (accepted + rejected) adaptive steps (0 for fixed-grid methods). All None when the counter is
    off or saw no step (no ODE block, or an integrator without torchdiffeq's step callbacks).
    """
    if train is None or not train["forward"].get("attempted"):
        return dict.fromkeys(STEP_FIELDS)
    fwd, bwd, evals = train["forward"], train["backward"], evals or {}

    def kept(counts: dict) -> int:
        return counts.get("accepted", 0) + counts.get("grid", 0)

    adaptive = fwd["accepted"] + fwd["rejected"]
    return {
        "steps_accepted_forward": kept(fwd) / n_batches,
        "steps_rejected_forward": fwd["rejected"] / n_batches,
        "steps_accepted_backward": kept(bwd) / n_batches,
        "steps_rejected_backward": bwd.get("rejected", 0) / n_batches,
        "steps_accepted_eval": kept(evals) / max(eval_batches, 1),
        "steps_rejected_eval": evals.get("rejected", 0) / max(eval_batches, 1),
        "min_step": fwd["min_step"],
        "rejected_fraction": fwd["rejected"] / adaptive if adaptive else 0.0,
    }


def _validity_check(model: torch.nn.Module, task, inst) -> dict:
    """The end-of-epoch validity columns (``trainer.instruments.validity``): reference and
    round-trip errors of every ODE block on the fixed batch (:func:`nodebench.validity.
    model_validity`), ``valid`` and the time the check took; None when off or without blocks."""
    if not inst.get("validity", True):
        return dict.fromkeys(VALIDITY_FIELDS)
    if hasattr(task, "validity"):  # the task's own checks (a CNF: nodebench.cnf.cnf_validity)
        watch = time.perf_counter()
        found = task.validity(model, float(inst.get("validity_threshold", DEFAULT_THRESHOLD)))
        if found is None:
            return dict.fromkeys(VALIDITY_FIELDS)
        return {**found, "validity_time_s": time.perf_counter() - watch}
    if not ode_blocks(model) or task.check_batch(1) is None:
        return dict.fromkeys(VALIDITY_FIELDS)
    watch = time.perf_counter()
    x, _ = task.check_batch(int(inst.get("validity_batch", 64)))
    found = model_validity(model, x, float(inst.get("validity_threshold", DEFAULT_THRESHOLD)))
    if found["validity_failure"]:
        log.warning("validity check: %s", found["validity_failure"])
    return {"validity_reference_error": found["validity_reference_error"],
            "validity_roundtrip_error": found["validity_roundtrip_error"],
            "valid": found["valid"], "validity_time_s": time.perf_counter() - watch}


def _gradient_check(model: torch.nn.Module, task, inst) -> dict | None:
    """Gradient error (``trainer.instruments.gradient_error``) of ``model`` against the float64
    1e-9 direct-backprop reference (:func:`nodebench.validity.gradient_error_of`) for the task's
    own loss on its fixed batch of ``gradient_error_batch`` items (``task.check_objective``:
    test images or points, the dynamics' sub-trajectories, the latent ODE's ELBO with fixed
    noise), with the seconds it took; None when off, when no module of the model carries a
    solve (:func:`nodebench.validity.solve_modules`: ODE blocks, or models that call the solver
    themselves) or when the task has no check objective. Draws no random numbers from the
    global RNG or the loop's generator."""
    if not inst.get("gradient_error", True) or not solve_modules(model):
        return None
    watch = time.perf_counter()
    objective = task.check_objective(int(inst.get("gradient_error_batch", 16)))
    if objective is None:
        return None
    found = gradient_error_of(model, objective)
    if found["failure"]:
        log.warning("gradient error check: %s", found["failure"])
    return {**found, "time_s": time.perf_counter() - watch}


def _grad_fields(when: str, found: dict | None) -> dict:
    """``grad_rel_error_<when>``, ``grad_cosine_<when>`` (and the seconds the check took) for
    summary.json; None when the check was off, failed, or (final) the run failed."""
    found = found or {}
    return {f"grad_rel_error_{when}": found.get("rel_error"),
            f"grad_cosine_{when}": found.get("cosine"),
            f"grad_check_time_s_{when}": found.get("time_s")}


def onecycle_restarts(optimizer: torch.optim.Optimizer, total_steps: int,
                      cycles: Any = (1.0,), peaks: Any = (1.0,), pct_start: float = 0.2,
                      div_factor: float = 25.0, final_div_factor: float = 1.0e4):
    """One-cycle learning rate per iteration, repeated: warm restarts of the one-cycle policy.

    Each cycle has the shape of torch's ``OneCycleLR`` with ``anneal_strategy='cos'`` (Smith &
    Topin 2019): cosine warm-up from ``peak / div_factor`` to ``peak`` over the first
    ``pct_start`` of the cycle, then cosine annealing to ``peak / div_factor / final_div_factor``.
    One cycle gives exactly OneCycleLR's rates. Several cycles restart the schedule (warm
    restarts, Loshchilov & Hutter 2017, SGDR) so that a run is annealed at the end of every cycle:
    the ANODE image preset ends its first cycle where the NODE arm's run ends, so the two are
    compared at equal wall time as two annealed models, and then spends the rest of its budget on
    a second cycle.

    ``cycles``: relative lengths (e.g. epochs), scaled to ``total_steps`` iterations (rounded);
    ``peaks``: each cycle's peak as a multiple of the optimiser's ``lr`` (the first cycle's peak
    is usually 1.0). Raises ConfigError when the lists differ in length, a value is not positive,
    ``pct_start`` is outside (0, 1) or a cycle would have no iteration.
    """
    cycles, peaks = [float(c) for c in cycles], [float(p) for p in peaks]
    if not cycles or len(cycles) != len(peaks):
        raise ConfigError(f"optim.scheduler.cycles and peaks must be lists of the same non-zero "
                          f"length, got {cycles} and {peaks}")
    if min(cycles + peaks + [div_factor, final_div_factor]) <= 0:
        raise ConfigError("optim.scheduler cycles, peaks, div_factor and final_div_factor must "
                          "be positive")
    if not 0.0 < pct_start < 1.0:
        raise ConfigError(f"optim.scheduler.pct_start must be in (0, 1), got {pct_start}")
    cum = np.cumsum(cycles) / sum(cycles)
    ends = [round(float(total_steps * c)) for c in cum]
    starts = [0] + ends[:-1]
    if min(e - b for b, e in zip(starts, ends)) < 1:
        raise ConfigError(f"optim.scheduler: cycles {cycles} over {total_steps} iterations leave "
                          f"a cycle without iterations")

    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (1.0 + math.cos(math.pi * min(max(pct, 0.0), 1.0)))

    def factor(step: int) -> float:
        i = next((k for k, e in enumerate(ends) if step < e), len(ends) - 1)
        n, local, peak = ends[i] - starts[i], step - starts[i], peaks[i]
        low = peak / div_factor
        up_end = pct_start * n - 1.0  # OneCycleLR's phase boundary (float, as torch computes it)
        if 0.0 < up_end and local <= up_end:
            return anneal(low, peak, local / up_end)
        return anneal(peak, low / final_div_factor,
                      (local - up_end) / max(n - 1.0 - up_end, 1e-12))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
