"""Instruments that observe a model from outside: NFE counters, step counters, activation memory,
timers.

Nothing here is called by model code. :class:`NFECounter` attaches forward pre-hooks to every
:class:`~nodebench.models.Dynamics` module (found by type), so it sees each evaluation of f,
including those of the adjoint's backward solve; the training loop says which phase is running.
:class:`StepCounter` attaches torchdiffeq's step callbacks to the same modules and counts the
accepted and rejected steps of every solve (and the steps of fixed-grid methods).
:class:`ActivationMeter` measures the bytes autograd keeps for backward when a forward pass ends
(``torch.autograd.graph.saved_tensors_hooks`` with weak references), each storage counted once
and parameters excluded: the quantity behind Table 1's memory column (O(L) ResNet, O(NFE)
RK-Net, O(1) ODE-Net). :func:`graph_saved_bytes` counts the same from the autograd graph.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models.blocks import Dynamics

MIB = 2.0 ** 20


class _Phases:
    """The phase an instrument counts into (``forward``, ``backward``, ``eval`` or None)."""

    phase: str | None = None

    @contextmanager
    def phase_(self, phase: str) -> Iterator[None]:
        """Count into ``phase`` while the context is open."""
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous


class NFECounter(_Phases):
    """Counts evaluations of each dynamics module, split by phase.

    Phases are set by the training loop: ``forward`` (the forward solve), ``backward`` (during
    ``loss.backward()``: non-zero only for adjoint gradients), ``eval``. With ``count=False`` no
    hook is attached (``trainer.instruments.nfe=false``): the phases still switch (the step
    counter reads them) and every count stays 0.
    """

    def __init__(self, model: nn.Module, count: bool = True) -> None:
        self.blocks = [name or "dynamics" for name, m in model.named_modules()
                       if isinstance(m, Dynamics)]
        self.phase: str | None = None
        self.counting = count   # False (trainer.instruments.nfe=false): phases only, no hooks
        self.counts: dict[str, int] = defaultdict(int)
        self._handles = [m.register_forward_pre_hook(self._hook)
                         for m in model.modules() if isinstance(m, Dynamics)] if count else []

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if self.phase is not None:
            self.counts[self.phase] += 1

    def take(self, phase: str) -> int:
        """Return and reset the count of ``phase``."""
        return self.counts.pop(phase, 0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self.blocks)


# The step callbacks torchdiffeq 0.2.5 looks up on the func given to odeint / odeint_adjoint
# (torchdiffeq/_impl/misc.py ``_check_inputs``: ``getattr(original_func, name)``, copied onto its
# wrapper; adjoint.py copies the ``*_adjoint`` ones onto the augmented dynamics of the backward
# solve). All are called as ``callback(t0, y0, dt)``.
STEP_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
ADJOINT_STEP_CALLBACKS = tuple(name + "_adjoint" for name in STEP_CALLBACKS)
_KIND = {"callback_step": "attempted", "callback_accept_step": "accepted",
         "callback_reject_step": "rejected"}
# Fixed-grid solvers call only ``callback_step``; torchdiffeq warns at every solve that they do not
# support the accept/reject callbacks StepCounter attaches. Only that exact warning is silenced.
_UNSUPPORTED_WARNING = (r"Solver '[^']*' does not support callbacks "
                        r"\{'callback_(accept|reject)_step'(, 'callback_(accept|reject)_step')?\}$")


class StepCounter(_Phases):
    """Accepted and rejected steps of every ODE solve, split by phase, counted from outside.

    For every :class:`~nodebench.models.Dynamics` module of ``model`` (found by type), sets the
    instance attributes ``callback_step``, ``callback_accept_step``, ``callback_reject_step`` and
    their ``*_adjoint`` versions, which torchdiffeq 0.2.5 looks up on the dynamics it is given and
    calls as ``(t0, y0, dt)`` at each step attempt, accepted step and rejected step of its adaptive
    Runge-Kutta solvers (``*_adjoint``: the same, during the adjoint's backward solve). Fixed-grid
    solvers call only ``callback_step``, once per grid step. A callback the module already had
    (an instance attribute or a method of its class) is still called after the count, and is
    restored by :meth:`remove`.

    Counts go to the current phase (``forward``, ``backward``, ``eval``): that of ``phases`` (any
    object with a ``phase`` attribute, e.g. the :class:`NFECounter` the training loop switches),
    or else the one set with :meth:`phase_`. Steps taken while the phase is None are not counted.
    The adjoint's backward steps count in the phase that is current when they are taken (the
    training loop's ``backward``).

    Per phase, :meth:`take` returns ``accepted`` and ``rejected`` steps of adaptive methods,
    ``grid`` steps of fixed-grid methods (attempts without a verdict), and ``min_step``, the
    smallest accepted ``|dt|`` (units of the ODE's time variable; for fixed-grid methods the
    smallest grid step). For dopri5 without ``first_step``, each solve takes
    ``NFE = 2 + 6 (accepted + rejected)`` evaluations of f (2 to choose the first step, then 6
    per attempt: 7 stages, the first shared with the previous step's last).

    Source: torchdiffeq 0.2.5 ``_impl/rk_common.py`` (``_adaptive_step``), ``_impl/solvers.py``
    (``FixedGridODESolver.integrate``), ``_impl/adjoint.py``; nodebench's own implicit methods
    call no callbacks (their steps are in ``nodebench.implicit.STATS``).
    """

    def __init__(self, model: nn.Module, phases: object | None = None) -> None:
        self._phases = phases
        self.phase: str | None = None
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self._min_accepted: dict[str, float] = {}
        self._min_attempted: dict[str, float] = {}
        self._attached: list[tuple[nn.Module, str, object]] = []
        modules = [m for m in model.modules() if isinstance(m, Dynamics)]
        if modules:
            warnings.filterwarnings("ignore", message=_UNSUPPORTED_WARNING, category=UserWarning)
        for module in modules:
            for name in STEP_CALLBACKS + ADJOINT_STEP_CALLBACKS:
                self._attach(module, name)
        self.blocks = len(modules)

    def _attach(self, module: nn.Module, name: str) -> None:
        previous = module.__dict__.get(name, _MISSING)
        chained = getattr(module, name, None)
        kind = _KIND[name.removesuffix("_adjoint")]
        record = self._record

        # A plain closure, not a bound method: copy.deepcopy of the model then shares it instead of
        # copying the counter.
        def callback(t0, y0, dt, _kind: str = kind, _next: Callable | None = chained):
            record(_kind, dt)
            if _next is not None:
                return _next(t0, y0, dt)
            return None

        setattr(module, name, callback)
        self._attached.append((module, name, previous))

    def _current_phase(self) -> str | None:
        return self._phases.phase if self._phases is not None else self.phase

    def _record(self, kind: str, dt: torch.Tensor | float) -> None:
        phase = self._current_phase()
        if phase is None:
            return
        self.counts[(phase, kind)] += 1
        if kind == "rejected":
            return
        h = abs(float(dt.detach() if isinstance(dt, torch.Tensor) else dt))  # a sync on CUDA
        table = self._min_accepted if kind == "accepted" else self._min_attempted
        if h < table.get(phase, math.inf):
            table[phase] = h

    def take(self, phase: str) -> dict:
        """Return and reset the counts of ``phase``.

        Returns ``{"accepted", "rejected", "grid", "attempted", "min_step"}``: ints, and
        ``min_step`` a float (None when no step was accepted). ``grid`` = attempts without an
        accept/reject verdict (fixed-grid steps); ``min_step`` is the smallest accepted adaptive
        step, or, when the phase took only fixed-grid steps, the smallest grid step.
        """
        accepted = self.counts.pop((phase, "accepted"), 0)
        rejected = self.counts.pop((phase, "rejected"), 0)
        attempted = self.counts.pop((phase, "attempted"), 0)
        min_accepted = self._min_accepted.pop(phase, None)
        min_attempted = self._min_attempted.pop(phase, None)
        grid = max(attempted - accepted - rejected, 0)
        min_step = min_accepted if accepted else (min_attempted if grid else None)
        return {"accepted": accepted, "rejected": rejected, "grid": grid,
                "attempted": attempted, "min_step": min_step}

    def remove(self) -> None:
        """Detach the callbacks, restoring what the modules had before (last attached first)."""
        for module, name, previous in reversed(self._attached):
            if previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, previous)
        self._attached.clear()

    @property
    def active(self) -> bool:
        return bool(self.blocks)


_MISSING = object()


def merge_steps(total: dict, taken: dict) -> dict:
    """Add the counts of one :meth:`StepCounter.take` into ``total`` (in place; also returned):
    counts are summed, ``min_step`` is the minimum of the non-None values."""
    for key in ("accepted", "rejected", "grid", "attempted"):
        total[key] = total.get(key, 0) + taken.get(key, 0)
    steps = [v for v in (total.get("min_step"), taken.get("min_step")) if v is not None]
    total["min_step"] = min(steps) if steps else None
    return total


def steps_done(taken: dict) -> int:
    """Steps a solver kept: accepted adaptive steps plus fixed-grid steps (every one is kept)."""
    return taken["accepted"] + taken["grid"]


class ActivationMeter:
    """Bytes that autograd keeps for backward at the end of a forward pass.

    While the context is open, every tensor autograd saves for backward is packed as a detached
    alias and a weak reference to that alias is kept. When the context closes (the forward pass
    and the loss are done), the aliases still alive are exactly the tensors the graph holds for
    ``backward()``; their storages are counted once each (views and repeated saves share a
    storage), parameters excluded. Tensors saved by graph branches that were freed before the
    forward pass ended (e.g. the step-size controller's error estimate of an adaptive solver)
    are not counted, and the reading does not depend on memory-address reuse, so repeated
    identical measurements give identical readings. On CUDA the peak allocated memory of the
    step is read too (``cuda_max_mib``).

    Units: ``last_bytes`` bytes, ``last_mib`` MiB (2**20 bytes).
    Source: the memory column of Table 1 of Chen et al. 2018 (O(L) ResNet, O(L~) RK-Net, O(1)
    ODE-Net), measured rather than asserted.
    """

    def __init__(self, model: nn.Module) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.last_bytes = 0
        self.cuda_max_mib: float | None = None

    @contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        saved: list[weakref.ref] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            # A detached alias, not ``t``: when ``t`` is the output of the op that saves it
            # (ReLU, exp, ...), keeping ``t`` itself makes a cycle output -> grad_fn -> output that
            # refcounting never frees (measured: +23 MiB per RK-Net step at batch 32).
            alias = t.detach()
            saved.append(weakref.ref(alias))
            return alias

        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
        self.last_bytes = storage_bytes((ref() for ref in saved), self._params)
        if cuda:
            self.cuda_max_mib = torch.cuda.max_memory_allocated(device) / MIB

    @property
    def last_mib(self) -> float:
        return self.last_bytes / MIB


def storage_bytes(tensors: Iterable[torch.Tensor | None], exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None entries skipped), leaving out
    storages whose data pointer is in ``exclude``. All tensors must be alive at once, so that
    equal data pointers mean the same storage."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude:
            seen[ptr] = storage.nbytes()
    return sum(seen.values())


def graph_saved_bytes(root: torch.Tensor, exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages the autograd graph of ``root`` holds for backward.

    An independent count of :class:`ActivationMeter`'s reading: walks ``root.grad_fn`` and every
    node reachable through ``next_functions``, and collects each node's saved tensors (the
    ``_saved_*`` attributes of built-in nodes and ``saved_tensors`` of custom
    ``torch.autograd.Function`` nodes). Raises RuntimeError if the graph was already freed by a
    ``backward()``.
    """
    tensors: list[torch.Tensor] = []
    seen_nodes: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for name in dir(node):
            if name.startswith("_saved_") or name == "saved_tensors":
                value = getattr(node, name)
                items = value if isinstance(value, (tuple, list)) else (value,)
                tensors.extend(v for v in items if isinstance(v, torch.Tensor))
        stack.extend(fn for fn, _ in node.next_functions)
    return storage_bytes(tensors, exclude)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class Stopwatch:
    """Wall time with a device sync, so GPU work is included in the reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.start = now - self.start, now
        return elapsed


def activation_mib(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """One training step's saved-activation memory and NFE, measured from outside.

    Returns ``{"activation_mib", "nfe_forward", "nfe_backward"}``. Used by the memory-scaling
    experiment and the tests; the trainer uses the same instruments.
    """
    nfe = NFECounter(model)
    meter = ActivationMeter(model)
    model.train()
    with nfe.phase_("forward"), meter.measure(x.device):
        out = model(x)
        loss = (nn.functional.cross_entropy(out, y) if y is not None else out.square().mean())
    with nfe.phase_("backward"):
        loss.backward()
    nfe.remove()
    return {"activation_mib": meter.last_mib, "nfe_forward": nfe.take("forward"),
            "nfe_backward": nfe.take("backward")}
