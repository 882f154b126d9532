"""Instruments that observe a model from outside: NFE counters, activation memory, timers.

Nothing here is called by model code. :class:`NFECounter` attaches forward pre-hooks to every
:class:`~nodebench.models.Dynamics` module (found by type), so it sees each evaluation of f,
including those of the adjoint's backward solve; the training loop says which phase is running.
:class:`ActivationMeter` measures the bytes autograd saves for backward during a forward pass
(``torch.autograd.graph.saved_tensors_hooks``), each storage counted once and parameters
excluded: the quantity behind Table 1's memory column (O(L) ResNet, O(NFE) RK-Net, O(1) ODE-Net).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
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
    """Bytes that autograd saves for backward while the context is open.

    Each saved tensor's storage is counted once (views and repeated saves share a storage);
    parameters are excluded. Works on CPU and GPU alike; on CUDA the peak allocated memory of the
    step is read too (``cuda_max_mib``).
    """

    def __init__(self, model: nn.Module) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.last_bytes = 0
        self.cuda_max_mib: float | None = None

    @contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        seen: dict[int, int] = {}
        params = self._params

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in params and ptr not in seen:
                seen[ptr] = storage.nbytes()
            # Return a detached alias, not ``t``: when ``t`` is the output of the op that saves it
            # (ReLU, exp, ...), keeping ``t`` itself makes a cycle output -> grad_fn -> output that
            # refcounting never frees (measured: +23 MiB per RK-Net step at batch 32).
            return t.detach()

        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
        self.last_bytes = sum(seen.values())
        if cuda:
            self.cuda_max_mib = torch.cuda.max_memory_allocated(device) / MIB

    @property
    def last_mib(self) -> float:
        return self.last_bytes / MIB


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
