"""Instruments that observe a model from outside: NFE counters, activation memory, timers.

Nothing here is called by model code. :class:`NFECounter` attaches forward pre-hooks to every
:class:`~nodebench.models.Dynamics` module (found by type), so it sees each evaluation of f,
including those of the adjoint's backward solve; the training loop says which phase is running.
:class:`ActivationMeter` measures the bytes autograd keeps for backward when a forward pass ends
(``torch.autograd.graph.saved_tensors_hooks`` with weak references), each storage counted once
and parameters excluded: the quantity behind Table 1's memory column (O(L) ResNet, O(NFE)
RK-Net, O(1) ODE-Net). :func:`graph_saved_bytes` counts the same from the autograd graph.
"""

from __future__ import annotations

import time
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models.blocks import Dynamics

MIB = 2.0 ** 20


class NFECounter:
    """Counts evaluations of each dynamics module, split by phase.

    Phases are set by the training loop: ``forward`` (the forward solve), ``backward`` (during
    ``loss.backward()``: non-zero only for adjoint gradients), ``eval``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.blocks = [name or "dynamics" for name, m in model.named_modules()
                       if isinstance(m, Dynamics)]
        self.phase: str | None = None
        self.counts: dict[str, int] = defaultdict(int)
        self._handles = [m.register_forward_pre_hook(self._hook)
                         for m in model.modules() if isinstance(m, Dynamics)]

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if self.phase is not None:
            self.counts[self.phase] += 1

    @contextmanager
    def phase_(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

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
