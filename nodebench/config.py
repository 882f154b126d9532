"""Composing, validating and instantiating configs from ``conf/`` (Hydra, version_base 1.3).

The config folder is the registry: a dataset, model, solver or optimiser is chosen by its config
group and built with ``_target_``. This module turns every way a config can be wrong into one
:class:`ConfigError` line, before a run directory is written.
"""

from __future__ import annotations

import inspect
import itertools
import os
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException, InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .solvers import Gradient, Solver

CONF_DIR = Path(os.environ.get("NODEBENCH_CONF", Path(__file__).resolve().parent.parent / "conf"))

if not OmegaConf.has_resolver("nb.lr_for_batch"):
    # SGD learning rate scaled with the batch size: 0.1 x batch / 128 (torchdiffeq's example).
    OmegaConf.register_new_resolver(
        "nb.lr_for_batch", lambda base, batch, ref=128: float(base) * float(batch) / float(ref))


def one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf errors span several lines; fold them into one readable line."""
    parts: list[str] = []
    options: list[str] = []
    for line in str(exc).splitlines():
        if line.startswith(("\t", "    ")):
            options.append(line.strip())
        elif line.strip() and not line.startswith(("full_key", "object_type", "Set the env")):
            if options:
                parts[-1] += " " + ", ".join(options)
                options = []
            parts.append(line.strip())
    if options and parts:
        parts[-1] += " " + ", ".join(options)
    return " ".join(parts) or type(exc).__name__


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides; errors become ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """All jobs of a multirun (``model=a,b seed=0,1`` -> 4 override lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(one_line(exc)) from None
    axes = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*axes)]


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None


def _call(node: Any, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with its wrapped errors unwrapped into one ConfigError line."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"invalid {what} config: {cause or one_line(exc)}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid {what} config: {one_line(exc)}") from None


def build_solver(cfg: DictConfig) -> Solver:
    node = OmegaConf.to_container(_get(cfg, "solver"), resolve=True)
    try:
        return Solver(**node)
    except TypeError as exc:
        raise ConfigError(f"invalid solver config: {exc}") from None


def build_gradient(cfg: DictConfig) -> Gradient:
    node = OmegaConf.to_container(_get(cfg, "adjoint"), resolve=True)
    try:
        return Gradient(mode=_get(cfg, "model.gradient"), **node)
    except TypeError as exc:
        raise ConfigError(f"invalid adjoint config: {exc}") from None


def is_ode_model(cfg: DictConfig) -> bool:
    """ODE models are those whose config names a gradient mode (odenet, rknet, anode, ...)."""
    return "gradient" in cfg.model


def build_model(cfg: DictConfig, in_channels: int, image_size: int,
                num_classes: int) -> torch.nn.Module:
    """Instantiate ``cfg.model`` (its ``_target_``) for a dataset of the given shape."""
    node = OmegaConf.to_container(_get(cfg, "model"), resolve=True)
    node.pop("name", None)
    node.pop("gradient", None)
    kwargs: dict[str, Any] = {"in_channels": in_channels, "image_size": image_size,
                              "num_classes": num_classes}
    if is_ode_model(cfg):
        kwargs.update(solver=build_solver(cfg), gradient=build_gradient(cfg))
    target = node.pop("_target_", None)
    try:
        builder = get_method(target)
    except Exception:  # noqa: BLE001
        raise ConfigError(f"invalid model config: cannot import {target!r}") from None
    accepted = inspect.signature(builder).parameters
    unknown = sorted(k for k in node if k not in accepted)
    if unknown:
        raise ConfigError(f"unknown model option(s) {', '.join(unknown)} for "
                          f"{cfg.model.name!r}")
    # Called directly, not through instantiate(): Hydra would turn the Solver and Gradient
    # objects into configs.
    return builder(**node, **kwargs)


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, total_steps: int = 1):
    """Optimiser and learning-rate scheduler from ``cfg.optim``.

    ``optim.interval`` says when the scheduler steps: ``epoch`` (MultiStepLR of the paper recipe)
    or ``step`` (per iteration; a scheduler taking ``total_steps`` gets the run's total).
    """
    opt = _call(_get(cfg, "optim.optimizer"), "optim", params=model.parameters())
    sched_node = _get(cfg, "optim.scheduler")
    if not sched_node:
        return opt, None
    interval = _get(cfg, "optim.interval")
    if interval not in ("epoch", "step"):
        raise ConfigError(f"optim.interval must be epoch or step, got {interval!r}")
    extra = {}
    target = sched_node.get("_target_")
    if target and "total_steps" in inspect.signature(get_method(target)).parameters:
        extra["total_steps"] = total_steps
    return opt, _call(sched_node, "optim.scheduler", optimizer=opt, **extra)


def check_trainer(cfg: DictConfig) -> None:
    t = _get(cfg, "trainer")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        value = t[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"trainer.{key} must be a positive integer, got {value!r}")
    if t.max_batches is not None and (not isinstance(t.max_batches, int) or t.max_batches <= 0):
        raise ConfigError(f"trainer.max_batches must be a positive integer or null, "
                          f"got {t.max_batches!r}")
    if t.device not in ("auto", "cpu") and not str(t.device).startswith("cuda"):
        raise ConfigError(f"trainer.device must be auto, cpu or cuda[:N], got {t.device!r}")
    if str(t.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device is cuda but no CUDA device is available")
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")


def check_dataset(cfg: DictConfig) -> None:
    """Cheap checks of the dataset config (the files exist) without loading it."""
    node = _get(cfg, "dataset")
    check = node.get("check")
    if check:
        _call({"_target_": check, "root": node.root}, "dataset")


def validate(cfg: DictConfig) -> None:
    """Everything that can be wrong with a config before training, as one ConfigError."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None
    check_trainer(cfg)
    shape = _get(cfg, "dataset.shape")
    model = build_model(cfg, shape.channels, shape.size, shape.classes)
    build_optimizer(cfg, model)
    check_dataset(cfg)
