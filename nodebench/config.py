"""Composing, validating and instantiating configs from ``conf/`` (Hydra, version_base 1.3).

The config folder is the registry: a dataset, model, solver or optimiser is chosen by its config
group and built with ``_target_``. This module turns every way a config can be wrong into one
:class:`ConfigError` line, before a run directory is written.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import re
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
if not OmegaConf.has_resolver("nb.root"):
    # Default data and run folders sit in the project folder (beside conf/), wherever nodebench
    # is started from: ${nb.root:data} -> <project>/data.
    OmegaConf.register_new_resolver(
        "nb.root", lambda sub="": str(CONF_DIR.resolve().parent / str(sub)))



def one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf errors span several lines; fold them into one readable line."""
    parts: list[str] = []
    options: list[str] = []
    for line in str(exc).splitlines():
        if line.startswith("Config search path"):  # Hydra's provider list: noise for a user
            break
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


def _hydra_compose(overrides: list[str], config_name: str,
                   return_hydra_config: bool) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides),
                                 return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _keys_of(cfg: DictConfig, key: str) -> str:
    """``key``'s parent node and the keys it has, for an error message."""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = sorted(str(k) for k in node) if isinstance(node, DictConfig) else []
    where = f"valid keys in {parent}" if parent else "valid top-level keys"
    return f"{where}: {', '.join(keys) or 'none'}"


def _unknown_key_message(overrides: list[str], key: str, config_name: str,
                         return_hydra_config: bool) -> str | None:
    """'Could not override KEY: no such key; valid keys in PARENT: ...', from the config composed
    without the overrides of ``key``; None if that cannot be composed either."""
    rest = [o for o in overrides if _override_key(o) != key]
    try:
        base = _hydra_compose(rest, config_name, return_hydra_config or key.startswith("hydra."))
    except Exception:  # noqa: BLE001 - the original message is used instead
        return None
    return f"Could not override '{key}': no such key; {_keys_of(base, key)}"


def normalize_overrides(overrides: list[str]) -> list[str]:
    """``solver.options.KEY=V`` -> ``++solver.options.KEY=V``: a solver option may be set with or
    without ``+`` (the solver checks the key and the value); other overrides are unchanged."""
    return [f"++{o}" if not o.startswith(("+", "~")) and o.startswith("solver.options.")
            and "=" in o else o for o in overrides]


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train",
            return_hydra_config: bool = False) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides.

    Raises ConfigError (one line) for an unknown group option, an unknown key (naming the valid
    keys of its parent), a malformed override, or a key added with ``+``/``++`` that the config
    does not have (except ``solver.options.*`` and ``model.*``, checked when the solver and the
    model are built): typos such as ``+trainer.epoch=3`` are not silently accepted.
    """
    overrides = normalize_overrides(list(overrides))
    try:
        cfg = _hydra_compose(overrides, config_name, return_hydra_config)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        message = one_line(exc)
        match = re.search(r"Could not override '([^']+)'", message)
        if match and ("not in struct" in message or "append" in message):
            message = _unknown_key_message(overrides, match.group(1), config_name,
                                           return_hydra_config) or message
        raise ConfigError(message) from None
    _check_additions(overrides, config_name)
    return cfg


# Keys under these may be added with +key=value: they are checked against the solver's and the
# model's accepted options when those are built (nodebench.solvers.Solver, build_model).
_OPEN_PREFIXES = ("solver.options.", "model.", "hydra.")  # hydra.*: Hydra checks its own


def _check_additions(overrides: list[str], config_name: str) -> None:
    added = [o for o in overrides if o.startswith("+") and "=" in o and "/" not in _override_key(o)
             and not _override_key(o).startswith(_OPEN_PREFIXES)]
    if not added:
        return
    rest = [o for o in overrides if not o.startswith("+")]
    try:
        base = _hydra_compose(rest, config_name, False)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(one_line(exc)) from None
    for o in added:
        key = _override_key(o)
        if OmegaConf.select(base, key, default=_MISSING_KEY,
                            throw_on_resolution_failure=False) is _MISSING_KEY:
            raise ConfigError(f"unknown key {key} (in {o}); {_keys_of(base, key)}")


_MISSING_KEY = object()


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


def model_inputs(cfg: DictConfig) -> dict[str, Any]:
    """What the dataset hands to every model built for it: ``in_channels``, ``image_size`` and
    ``num_classes`` from ``dataset.shape`` (images), else the ``dataset.inputs`` node (e.g.
    ``data_dim`` and ``readout`` for the toy sets, ``obs_dim`` for the spirals)."""
    node = _get(cfg, "dataset")
    if "shape" in node:
        shape = node.shape
        return {"in_channels": shape.channels, "image_size": shape.size,
                "num_classes": shape.classes}
    if "inputs" not in node:
        raise ConfigError(f"dataset {node.get('name')!r} has neither shape nor inputs")
    return OmegaConf.to_container(node.inputs, resolve=True)


def build_task(cfg: DictConfig):
    """The dataset's data, loaded, wrapped in its task (:mod:`nodebench.tasks`): ``dataset.task``
    (a ``_target_`` node called with ``data=``), :class:`~nodebench.tasks.Classification` for
    image datasets without one. Raises ConfigError for a bad dataset or task option."""
    from .tasks import Classification

    node = OmegaConf.to_container(_get(cfg, "dataset"), resolve=True)
    task_node = node.pop("task", None)
    if task_node is not None:  # the builders of the non-image sets take only their own options
        node.pop("inputs", None)
        node.pop("name", None)
    data = _call(node, "dataset")
    if task_node is None:
        return Classification(data)
    target = task_node.pop("_target_", None)
    try:
        builder = get_method(target)
    except Exception:  # noqa: BLE001
        raise ConfigError(f"invalid dataset.task config: cannot import {target!r}") from None
    try:
        return builder(data=data, **task_node)
    except TypeError as exc:
        raise ConfigError(f"invalid dataset.task config: {exc}") from None


def build_model(cfg: DictConfig, in_channels: int | None = None, image_size: int | None = None,
                num_classes: int | None = None, *,
                inputs: dict[str, Any] | None = None) -> torch.nn.Module:
    """Instantiate ``cfg.model`` (its ``_target_``) for a dataset of the given image shape, or with
    the dataset's ``inputs`` (:func:`model_inputs`). Raises ConfigError for an unknown model
    option, or a model that does not take the dataset's inputs (e.g. a toy model on images)."""
    node = OmegaConf.to_container(_get(cfg, "model"), resolve=True)
    node.pop("name", None)
    node.pop("gradient", None)
    kwargs: dict[str, Any] = dict(inputs) if inputs is not None else {
        "in_channels": in_channels, "image_size": image_size, "num_classes": num_classes}
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
    named = {k for k, v in accepted.items() if v.kind != inspect.Parameter.VAR_KEYWORD}
    misfit = sorted(k for k in kwargs if k not in named)
    if misfit:
        raise ConfigError(f"model {cfg.model.name!r} does not fit dataset "
                          f"{_get(cfg, 'dataset.name')!r}: it takes no {', '.join(misfit)} "
                          f"(choose a model made for this dataset's task)")
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(name: str, value: Any, allow_none: bool = False) -> None:
    """``value`` must be an integer >= 1 (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer{' or null' if allow_none else ''}, "
                          f"got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def check_trainer(cfg: DictConfig) -> None:
    """Types and ranges of ``trainer.*`` and ``seed``; raises ConfigError naming the key."""
    t = _get(cfg, "trainer")
    for key in ("epochs", "batch_size", "eval_batch_size", "log_every", "eval_every"):
        _check_count(f"trainer.{key}", t.get(key, 1))
    for key in ("max_batches", "threads"):
        _check_count(f"trainer.{key}", t.get(key), allow_none=True)
    for key in ("deterministic", "channels_last", "progress", "save_model", "checkpoint",
                "resume"):
        if key in t:
            _check_bool(f"trainer.{key}", t[key])
    inst = t.get("instruments")
    if inst is not None:
        for key in ("nfe", "memory", "steps", "validity", "gradient_error"):
            if key in inst:
                _check_bool(f"trainer.instruments.{key}", inst[key])
        for key in ("memory_every", "validity_every", "validity_batch", "gradient_error_batch"):
            if key in inst:
                _check_count(f"trainer.instruments.{key}", inst[key])
        if "validity_threshold" in inst:
            value = inst.validity_threshold
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"trainer.instruments.validity_threshold must be a positive "
                                  f"number, got {value!r}")
    if t.device not in ("auto", "cpu") and not str(t.device).startswith("cuda"):
        raise ConfigError(f"trainer.device must be auto, cpu or cuda[:N], got {t.device!r}")
    if str(t.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device is cuda but no CUDA device is available")
    if not _is_int(cfg.seed):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")


# Images in the full training and test sets of the datasets read from files (subsets can only be
# smaller; a larger train_size/test_size is an error, not silently the whole set).
FULL_SIZES = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000), "kmnist": (60000, 10000),
              "cifar10": (50000, 10000), "cifar100": (50000, 10000), "svhn": (73257, 26032)}


def check_dataset(cfg: DictConfig, check_files: bool = True) -> None:
    """Cheap checks of the dataset config without loading it: sizes are integers >= 1 (or null
    for the full set) and at most the full set, the training set holds at least one batch, the
    files exist. Raises ConfigError naming the key."""
    node = _get(cfg, "dataset")
    full = FULL_SIZES.get(str(node.get("name"))) if not node.get("fake", False) else None
    sizes = {}
    for i, key in enumerate(("train_size", "test_size")):
        if key not in node:
            continue
        value = node[key]
        _check_count(f"dataset.{key}", value, allow_none=full is not None)
        if full is not None and value is not None and value > full[i]:
            raise ConfigError(f"dataset.{key}={value} exceeds the {full[i]} images of "
                              f"{node.name}'s {key.split('_')[0]} set")
        sizes[key] = value if value is not None else (full[i] if full else None)
    batch = _get(cfg, "trainer.batch_size")
    if sizes.get("train_size") is not None and batch > sizes["train_size"]:
        raise ConfigError(f"trainer.batch_size {batch} exceeds the {sizes['train_size']} "
                          f"training images (dataset.train_size)")
    check = node.get("check")
    if check and check_files:
        _call({"_target_": check, "root": node.root}, "dataset")


def check_model(cfg: DictConfig) -> None:
    """The integration interval [0, model.t1] is a positive finite length, and a fixed step is
    not longer than it (that would be one step of another size). Raises ConfigError."""
    node = _get(cfg, "model")
    if "t1" not in node:
        return
    t1 = node.t1
    if not isinstance(t1, (int, float)) or isinstance(t1, bool) or not math.isfinite(t1) \
            or t1 <= 0:
        raise ConfigError(f"model.t1 (the integration interval [0, t1]) must be a positive "
                          f"number, got {t1!r}")
    if is_ode_model(cfg):
        h = _get(cfg, "solver.step_size")
        if isinstance(h, (int, float)) and not isinstance(h, bool) and h > t1 * (1 + 1e-9):
            raise ConfigError(f"solver.step_size={h:g} is larger than the integration interval "
                              f"[0, {t1:g}]: choose a step of at most {t1:g}")


def validate(cfg: DictConfig, check_files: bool = True) -> None:
    """Everything that can be wrong with a config before training, as one ConfigError.

    The plain settings are checked before interpolations are resolved, so that e.g.
    ``trainer.batch_size=abc`` is named as such and not as the learning rate computed from it.
    ``check_files=False`` skips the check that the data files exist (``--cfg job``).
    """
    check_trainer(cfg)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None
    check_model(cfg)
    model = build_model(cfg, inputs=model_inputs(cfg))
    t = _get(cfg, "trainer")   # a lower bound of the run's iterations; train.py passes the count
    build_optimizer(cfg, model, total_steps=int(t.epochs) * int(t.get("max_batches") or 1))
    check_dataset(cfg, check_files)
