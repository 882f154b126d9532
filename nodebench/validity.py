"""Was the solve accurate? Reference-solve and round-trip errors of the ODE blocks, and the error of
the run's parameter gradient.

NFE, memory and test error only mean something if the ODE was actually solved. Three checks,
each observed from outside the model (nothing here is called by model code):

* **Reference error** of an ODE block: its output ``y(t1)`` against a tight reference solve of the
  same input (dopri5 at ``rtol = atol = 1e-8`` in float64, on a float64 copy of the dynamics).
* **Round-trip error**: integrate from the block's ``y(t1)`` back to ``t0`` with the run's own
  solver and compare with ``y(t0)``. An accurate solve of an invertible flow returns to the
  input. Chen et al. 2018 section 6 ("Reconstructing forward trajectories") check this only
  informally; the independent ANODE replication (``shared/docs/reference.md`` section 5)
  requires it of every result and finds that at tolerance 1e-3 no trained image model passes.
* **Gradient error**: the run's parameter gradient of the loss (its solver, gradient mode and
  dtype) against a float64 direct-backprop reference through dopri5 at ``rtol = atol = 1e-9``,
  at the same weights: relative error and cosine. The reference rewires every module that
  carries a solve (:func:`solve_modules`: a ``solver`` and ``gradient`` attribute pair), so it
  applies to ODE blocks and to models that call the solver themselves (the dynamics nets'
  :class:`~nodebench.dynamics.TrajectoryODE`, the :class:`~nodebench.latent.LatentODE`); the
  loss is an *objective* ``objective(module, dtype)`` (:data:`Objective`), a task's training
  loss on a fixed batch (``check_objective`` of :mod:`nodebench.tasks`).

Errors are relative, in the 2-norm over all elements of the batch (:func:`relative_error`),
dimensionless. A block's solve is **valid** when both its reference and its round-trip errors
are below :data:`DEFAULT_THRESHOLD` = 1e-2 (1 %; configurable), and both checks ran (a check
whose solve fails numerically makes the block invalid, with the reason in ``failure``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import classify_solver_error
from .models.blocks import ODEBlock
from .solvers import Gradient, Solver, odesolve

DEFAULT_THRESHOLD = 1e-2        # relative error below which a solve counts as valid
REFERENCE_TOL = 1e-8            # rtol = atol of the reference solve (dopri5, float64)
GRADIENT_REFERENCE_TOL = 1e-9   # rtol = atol of the reference gradient (dopri5, float64, direct)
REFERENCE_MAX_STEPS = 100_000   # a reference solve that needs more fails (reason recorded)
DIRECT = Gradient("direct")
# The loss of the gradient-error check: objective(module, dtype) -> scalar tensor, the loss of
# ``module`` (the run's model, or its float64 reference copy) on one fixed batch, the batch's
# floating-point inputs and targets cast to ``dtype`` (the module's). It must be deterministic
# (any noise drawn the same way on every call) and leave the global RNG alone.
Objective = Callable[[nn.Module, torch.dtype], torch.Tensor]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact||_2 / ||exact||_2`` over all elements (a batch counts as one vector),
    computed in float64. Shapes must match. When ``exact`` is zero, the absolute error
    ``||approx - exact||_2`` is returned. NaN or inf entries give NaN or inf."""
    if approx.shape != exact.shape:
        raise ValueError(f"shapes differ: {tuple(approx.shape)} vs {tuple(exact.shape)}")
    a, e = approx.detach().double(), exact.detach().to(approx.device).double()
    diff = torch.linalg.vector_norm(a - e).item()
    scale = torch.linalg.vector_norm(e).item()
    return diff / scale if scale > 0 else diff


def reference_solver(tol: float = REFERENCE_TOL,
                     max_num_steps: int | None = REFERENCE_MAX_STEPS) -> Solver:
    """dopri5 at ``rtol = atol = tol``: the reference of the validity checks."""
    return Solver(method="dopri5", rtol=tol, atol=tol, max_num_steps=max_num_steps)


@dataclass
class Validity:
    """The checks of one solve (or the worst over several).

    ``reference_error``, ``roundtrip_error``: relative errors (dimensionless), None when that
    check's solve failed; ``valid``: both ran and both are below ``threshold``; ``failure``: the
    reason of a failed check's solve (None when both ran).
    """

    reference_error: float | None
    roundtrip_error: float | None
    valid: bool
    threshold: float
    failure: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _numerical(exc: Exception) -> str:
    """The reason of a numerical solver failure; anything else (a bug) is re-raised."""
    reason = classify_solver_error(exc)
    if reason is None:
        raise exc
    return reason


def _is_valid(reference: float | None, roundtrip: float | None, threshold: float) -> bool:
    return (reference is not None and roundtrip is not None
            and reference < threshold and roundtrip < threshold)


def solve_validity(func: nn.Module, y0: torch.Tensor, t: torch.Tensor, solver: Solver,
                   threshold: float = DEFAULT_THRESHOLD, y1: torch.Tensor | None = None,
                   reference: Solver | None = None) -> Validity:
    """Reference and round-trip errors of solving ``dy/dt = func(t, y)`` over ``[t[0], t[-1]]``.

    Args:
        func: the dynamics (any ``nn.Module`` ``f(t, y)``; a float64 copy is made for the
            reference unless ``y0`` is already float64). Not modified.
        y0: the state at ``t[0]``, shape (*S) (for an image ODE block (B, C, H, W)).
        t: times, shape (T,), T >= 2; only the first and last are used.
        solver: the run's solver; the round trip integrates back with it.
        threshold: relative error below which both checks pass (default 1e-2).
        y1: the run's ``y(t[-1])``, shape (*S), if already computed (e.g. the block's output);
            otherwise solved here with ``solver``.
        reference: the reference solver (default dopri5 at 1e-8, :func:`reference_solver`).

    Returns a :class:`Validity`. A numerical failure of a solve (``max_num_steps exceeded``,
    ``underflow in dt``, ...) makes that error None and the result invalid; other exceptions
    propagate. Cost: one solve with ``solver`` (two without ``y1``) and one float64 solve at the
    reference tolerance, without gradients.
    """
    reference = reference or reference_solver()
    span = torch.stack([t[0], t[-1]]).to(y0.dtype)
    failures: list[str] = []
    ref_err = trip_err = None
    with torch.no_grad():
        if y1 is None:
            try:
                y1 = odesolve(func, y0, span, solver, DIRECT)[-1]
            except Exception as exc:  # noqa: BLE001 - only numerical failures are kept
                reason = _numerical(exc)
                return Validity(None, None, False, threshold, reason)
        try:
            f64 = func if y0.dtype == torch.float64 else copy.deepcopy(func).double()
            exact = odesolve(f64, y0.double(), span.double(), reference, DIRECT)[-1]
            ref_err = relative_error(y1, exact)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"reference solve: {_numerical(exc)}")
        try:
            back = odesolve(func, y1, span.flip(0), solver, DIRECT)[-1]
            trip_err = relative_error(back, y0)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"round trip: {_numerical(exc)}")
    return Validity(ref_err, trip_err, _is_valid(ref_err, trip_err, threshold), threshold,
                    "; ".join(failures) or None)


def ode_blocks(model: nn.Module) -> list[ODEBlock]:
    """Every :class:`~nodebench.models.blocks.ODEBlock` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ODEBlock)]


def block_solves(model: nn.Module, x: torch.Tensor) -> list[tuple[ODEBlock, torch.Tensor,
                                                                  torch.Tensor]]:
    """Run ``model(x)`` once without gradients and return, for every ODE block it calls, the
    block, its initial state ``y(t0)`` (:meth:`ODEBlock.initial_state` of its input) and its
    output ``y(t1)``, both shaped like the block's state (B, C + augment_dim, ...)."""
    found: list[tuple[ODEBlock, torch.Tensor, torch.Tensor]] = []

    def hook(block: nn.Module, args: tuple, output: torch.Tensor) -> None:
        found.append((block, block.initial_state(args[0]).detach(), output.detach()))

    handles = [b.register_forward_hook(hook) for b in ode_blocks(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


def model_validity(model: nn.Module, x: torch.Tensor, threshold: float = DEFAULT_THRESHOLD,
                   reference: Solver | None = None) -> dict:
    """The validity checks of every ODE block of ``model`` on the batch ``x``, in eval mode.

    Returns ``{"validity_reference_error", "validity_roundtrip_error", "valid",
    "validity_failure", "validity_blocks"}``: the largest errors over the blocks (None if a check
    failed in any block), ``valid`` (all blocks valid), the failure reasons, and the per-block
    :meth:`Validity.as_dict` list. A model without ODE blocks gives None everywhere. The model's
    train/eval mode is restored; its weights are not changed.
    """
    keys = ("validity_reference_error", "validity_roundtrip_error", "valid", "validity_failure")
    if not ode_blocks(model):
        return {**dict.fromkeys(keys), "validity_blocks": []}
    was_training = model.training
    model.eval()
    try:
        solves = block_solves(model, x)
        results = [solve_validity(b.func, y0, b.t, b.solver, threshold, y1=y1,
                                  reference=reference) for b, y0, y1 in solves]
    finally:
        model.train(was_training)

    def worst(values: list[float | None]) -> float | None:
        """The largest error; None if any check failed, NaN if any error is NaN."""
        if not values or any(v is None for v in values):
            return None
        if any(math.isnan(v) for v in values):
            return math.nan
        return max(values)

    failures = [r.failure for r in results if r.failure]
    return {
        "validity_reference_error": worst([r.reference_error for r in results]),
        "validity_roundtrip_error": worst([r.roundtrip_error for r in results]),
        "valid": bool(results) and all(r.valid for r in results),
        "validity_failure": "; ".join(failures) or None,
        "validity_blocks": [r.as_dict() for r in results],
    }


def _flat_grad(grads: tuple[torch.Tensor | None, ...], params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().double().reshape(-1)
                      for g, p in zip(grads, params)])


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def solve_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that carries an ODE solve, in module order.

    The protocol (what :func:`reference_model` rewires): a module carries a solve when it has a
    ``solver`` attribute (a :class:`~nodebench.solvers.Solver`) and a ``gradient`` attribute (a
    :class:`~nodebench.solvers.Gradient`) and reads both at every forward, passing them to
    :func:`~nodebench.solvers.odesolve` (or the penalised solve); a module that integrates
    penalties in training mode also offers ``drop_penalties()`` (the plain solve from then on).
    Carriers: :class:`~nodebench.models.blocks.ODEBlock` (image, toy and shapes models), the
    dynamics nets' :class:`~nodebench.dynamics.TrajectoryODE`, the
    :class:`~nodebench.latent.LatentODE`, a :class:`~nodebench.cnf.CNF`. Modules nested in a
    carrier are listed too (a carrier holding ODE blocks: both).
    """
    return [m for m in model.modules()
            if isinstance(getattr(m, "solver", None), Solver)
            and isinstance(getattr(m, "gradient", None), Gradient)]


def reference_model(model: nn.Module, tol: float = GRADIENT_REFERENCE_TOL,
                    max_num_steps: int | None = REFERENCE_MAX_STEPS) -> nn.Module:
    """A float64 copy of ``model`` (``copy.deepcopy``, same weights) whose every module that
    carries a solve (:func:`solve_modules`: ODE blocks, and models that call the solver
    themselves such as the latent ODE) solves with dopri5 at ``rtol = atol = tol`` and takes
    gradients by direct backprop, without penalties (``drop_penalties()`` where a module has
    it)."""
    ref = copy.deepcopy(model).double()
    solver = reference_solver(tol, max_num_steps)
    for module in solve_modules(ref):
        module.solver = solver
        module.gradient = DIRECT
        drop = getattr(module, "drop_penalties", None)
        if callable(drop):
            drop()  # RNODE / TayNODE terms: the exact gradient of the plain loss
    return ref


def _dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter (the default dtype if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()),
                torch.get_default_dtype())


def batch_objective(x: torch.Tensor, y: torch.Tensor,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _cross_entropy,
                    ) -> Objective:
    """The :data:`Objective` ``loss_fn(module(x), y)`` of a model called on one input batch
    ``x`` (B, ...) (cast to the module's dtype; ``y`` as given, e.g. class indices (B,))."""
    def objective(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return loss_fn(module(x.to(dtype)), y)

    return objective


def gradient_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _cross_entropy,
                   tol: float = GRADIENT_REFERENCE_TOL,
                   max_num_steps: int | None = REFERENCE_MAX_STEPS) -> dict:
    """Error of the run's parameter gradient against a float64, tight-tolerance direct-backprop
    reference at the same weights, on one batch: :func:`gradient_error_of` with the objective
    ``loss_fn(model(x), y)`` (:func:`batch_objective`).

    Args:
        model: the trained (or initial) model, with its own solvers and gradient modes.
        x, y: one batch: inputs (B, ...) and targets for ``loss_fn`` (class indices (B,) for the
            default cross-entropy). ``x`` is cast to float64 for the reference.
        loss_fn: ``loss_fn(model(x), y)`` -> scalar loss.
        tol: rtol = atol of the reference (dopri5), default 1e-9.

    Returns and cost as :func:`gradient_error_of`.
    """
    return gradient_error_of(model, batch_objective(x, y, loss_fn), tol, max_num_steps)


def gradient_error_of(model: nn.Module, objective: Objective,
                      tol: float = GRADIENT_REFERENCE_TOL,
                      max_num_steps: int | None = REFERENCE_MAX_STEPS) -> dict:
    """Error of the run's parameter gradient of ``objective`` against a float64,
    tight-tolerance direct-backprop reference at the same weights (:func:`reference_model`).

    Args:
        model: the trained (or initial) model, with its own solvers and gradient modes; every
            module that carries a solve (:func:`solve_modules`) is rewired in the reference.
        objective: ``objective(module, dtype)`` -> scalar loss on one fixed batch
            (:data:`Objective`); called as ``objective(model, <model's dtype>)`` and
            ``objective(reference, torch.float64)``. Deterministic: any noise it uses must be
            the same draw on both calls (e.g. from its own seeded generator).
        tol: rtol = atol of the reference (dopri5), default 1e-9.

    Both gradients are taken in train mode with ``torch.autograd.grad`` (the parameters' ``.grad``
    are left alone) over every parameter that requires a gradient, flattened into one vector:
    ``g`` (the run's) and ``g_ref``. Returns ``{"rel_error": ||g - g_ref|| / ||g_ref||,
    "cosine": <g, g_ref> / (||g|| ||g_ref||), "failure": None}`` (dimensionless); when a solve
    fails numerically both are None and ``failure`` gives the reason. For fixed-step methods the
    reference is still the exact flow's gradient, so the error includes the discretisation error.
    With RNODE / TayNODE penalties (``ODEBlock(penalties=...)``) the run's gradient is taken
    through its penalised training solve (the gradient of the objective only; the penalty terms
    are discarded) and the reference solves plainly.
    Cost: one training step of the run plus one float64 direct-backprop step at 1e-9 (memory
    O(NFE) of that solve: keep the batch small).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    # buffers a train-mode forward may update (e.g. BatchNorm statistics) are put back afterwards
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.enable_grad():
            model.train()
            ref = reference_model(model, tol, max_num_steps)
            ref.train()
            ref_params = [p for p in ref.parameters() if p.requires_grad]
            loss = objective(model, _dtype(model))
            g = _flat_grad(torch.autograd.grad(loss, params, allow_unused=True), params)
            del loss
            loss_ref = objective(ref, torch.float64)
            g_ref = _flat_grad(torch.autograd.grad(loss_ref, ref_params, allow_unused=True),
                               ref_params)
    except Exception as exc:  # noqa: BLE001 - only numerical failures are kept
        return {"rel_error": None, "cosine": None, "failure": _numerical(exc)}
    finally:
        model.train(was_training)
        for module in solve_modules(model):  # penalty terms left by the check's training-mode
            if getattr(module, "pending_penalties", None) is not None:  # forward: not the loop's
                module.pending_penalties = None
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    norm, norm_ref = torch.linalg.vector_norm(g).item(), torch.linalg.vector_norm(g_ref).item()
    diff = torch.linalg.vector_norm(g - g_ref.to(g.device)).item()
    rel = diff / norm_ref if norm_ref > 0 else diff
    cosine = (torch.dot(g, g_ref.to(g.device)).item() / (norm * norm_ref)
              if norm > 0 and norm_ref > 0 else math.nan)
    return {"rel_error": rel, "cosine": cosine, "failure": None}


__all__ = ["DEFAULT_THRESHOLD", "GRADIENT_REFERENCE_TOL", "REFERENCE_TOL", "Objective",
           "Validity", "batch_objective", "block_solves", "gradient_error", "gradient_error_of",
           "model_validity", "ode_blocks", "reference_model", "reference_solver",
           "relative_error", "solve_modules", "solve_validity"]
