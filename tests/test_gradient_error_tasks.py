"""Gradient error of models that call the solver themselves (issue 13, item 4): the seed-001
dynamics nets (TrajectoryFit) and Chen et al.'s latent ODE (LatentSequence) have no ODE block, so
the reference rewires every module that carries a ``solver``/``gradient`` pair
(``nodebench.validity.solve_modules``) and the task gives the check its own training loss on a
fixed batch (``check_objective``). Known answers: a float64 model that solves as the reference
does has zero error (so the batch and the latent ODE's reparameterisation noise are the same in
both forwards); the error at a tight tolerance is far below that at a loose one; `nodebench train`
writes finite errors for both families, None for the RNN baseline, and the check draws no random
numbers (the latent run's training numbers are the same with the check on or off). CPU, seconds."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from nodebench import config as C
from nodebench.cli import main
from nodebench.dynamics import TrajectoryODE
from nodebench.latent import LatentODE
from nodebench.solvers import Gradient, Solver
from nodebench.validity import (
    GRADIENT_REFERENCE_TOL,
    REFERENCE_MAX_STEPS,
    gradient_error_of,
    reference_model,
    reference_solver,
    solve_modules,
)

DYNAMICS = ["experiment=seed001_dynamics", "profile=tiny", "dataset=ode_spiral",
            "model=ode_small"]
SPIRALS = ["experiment=chen2018_table2", "profile=tiny"]   # Table 2 on the tiny spirals
LATENT = [*SPIRALS, "model=latent_ode"]
RNN = [*SPIRALS, "model=rnn"]   # (one model= override per command: Hydra refuses two)
CHECK = ["trainer.instruments.gradient_error=true", "trainer.instruments.gradient_error_batch=4"]
FAMILIES = {"dynamics": DYNAMICS, "latent": LATENT}


def build(overrides: list[str]):
    """The task and the initial model of a run with ``overrides`` (seeded as the trainer seeds
    them; CPU)."""
    cfg = C.compose([*overrides, "trainer.device=cpu"])
    torch.manual_seed(int(cfg.seed))
    task = C.build_task(cfg)
    model = C.build_model(cfg, inputs=C.model_inputs(cfg))
    return task, model


def train(runs_dir, overrides: list[str], name: str) -> tuple[dict, pd.DataFrame]:
    """One `nodebench train` run into ``runs_dir/name``: its summary.json and metrics.csv."""
    run_dir = runs_dir / name
    assert main(["train", *overrides, f"paths.runs={runs_dir}",
                 f"hydra.run.dir={run_dir}"]) == 0
    return (json.loads((run_dir / "summary.json").read_text()),
            pd.read_csv(run_dir / "metrics.csv"))


def set_solver(model: nn.Module, solver: Solver) -> None:
    model.solver, model.gradient = solver, Gradient("direct")


# --- the protocol ----------------------------------------------------------------------------

@pytest.mark.parametrize("family, cls", [("dynamics", TrajectoryODE), ("latent", LatentODE)])
def test_models_that_call_the_solver_carry_a_solve_and_the_reference_rewires_it(family, cls):
    _, model = build(FAMILIES[family])
    assert isinstance(model, cls) and solve_modules(model) == [model]
    own = model.solver
    ref = reference_model(model)
    assert ref.solver == reference_solver(GRADIENT_REFERENCE_TOL, REFERENCE_MAX_STEPS)
    assert ref.gradient.mode == "direct"
    assert all(p.dtype == torch.float64 for p in ref.parameters())
    assert model.solver == own and all(p.dtype == torch.float32 for p in model.parameters())
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a.double(), b)


def test_the_rnn_baseline_carries_no_solve():
    _, model = build(RNN)
    assert solve_modules(model) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_check_objective_is_deterministic_and_leaves_the_global_rng_alone(family):
    task, model = build(FAMILIES[family])
    objective = task.check_objective(4)
    state = torch.get_rng_state()
    with torch.no_grad():
        a = objective(model, torch.float32)
        b = task.check_objective(4)(model, torch.float32)  # built again: the same batch
    assert torch.equal(torch.get_rng_state(), state)
    assert a.ndim == 0 and math.isfinite(a.item()) and torch.equal(a, b)


# --- known answers ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_a_float64_model_that_solves_as_the_reference_has_zero_error(family):
    """The run's model is the reference (float64, dopri5 1e-9, direct backprop): both forwards
    compute the same numbers, so the error is zero only if they see the same batch and (latent
    ODE) the same reparameterisation noise; a fresh draw per forward would give an O(1) error."""
    task, model = build(FAMILIES[family])
    model.double()
    set_solver(model, reference_solver(GRADIENT_REFERENCE_TOL, REFERENCE_MAX_STEPS))
    found = gradient_error_of(model, task.check_objective(4))
    assert found["failure"] is None
    assert found["rel_error"] < 1e-10 and found["cosine"] == pytest.approx(1.0, abs=1e-10)
    assert all(p.grad is None for p in model.parameters())      # .grad left alone


@pytest.mark.parametrize("family", FAMILIES)
def test_error_at_a_tight_tolerance_is_far_below_that_at_a_loose_one(family):
    """dopri5 with direct backprop at rtol = atol = 1e-2 and 1e-7 (float64, so that float32
    rounding does not floor the tight error). The dynamics net's initial field is nearly linear
    and weak (weights N(0, 0.1^2)), which dopri5 solves accurately at any tolerance; its weights
    are redrawn N(0, 1) here so that the field is strongly nonlinear."""
    errors = {}
    for tol in (1e-2, 1e-7):
        task, model = build(FAMILIES[family])
        model.double()
        if family == "dynamics":
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for layer in model.func.net:
                    if isinstance(layer, nn.Linear):
                        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen,
                                                       dtype=torch.float64))
        set_solver(model, Solver("dopri5", rtol=tol, atol=tol, max_num_steps=100_000))
        found = gradient_error_of(model, task.check_objective(8))
        assert found["failure"] is None and -1 <= found["cosine"] <= 1 + 1e-12
        errors[tol] = found["rel_error"]
    assert errors[1e-2] > 0
    assert errors[1e-7] < 1e-4 and errors[1e-7] < errors[1e-2] / 10, errors


# --- through `nodebench train` ---------------------------------------------------------------

def _assert_gradient_fields(s: dict) -> None:
    assert s["status"] == "ok"
    for when in ("init", "final"):
        rel, cos = s[f"grad_rel_error_{when}"], s[f"grad_cosine_{when}"]
        assert rel is not None and math.isfinite(rel) and 0 <= rel < 1, (when, rel)
        assert cos is not None and 0.99 < cos <= 1 + 1e-9, (when, cos)
        assert s[f"grad_check_time_s_{when}"] > 0


def test_train_dynamics_run_writes_the_gradient_error(runs_dir):
    s, _ = train(runs_dir, [*DYNAMICS, *CHECK], "dynamics")
    _assert_gradient_fields(s)
    assert s["task"] == "trajectory"


def test_train_latent_run_writes_the_gradient_error_and_trains_as_without_it(runs_dir):
    """The check (at initialisation, before training) draws no random numbers: the latent ODE,
    whose training ELBO draws its noise from the global RNG, trains to the same numbers with the
    check on and off."""
    s, on = train(runs_dir, [*LATENT, *CHECK], "on")
    _assert_gradient_fields(s)
    assert s["task"] == "latent"
    s_off, off = train(runs_dir, [*LATENT, "trainer.instruments.gradient_error=false"], "off")
    assert s_off["grad_rel_error_init"] is None and s_off["grad_rel_error_final"] is None
    same = ["epoch", "train_loss", "test_rmse", "test_rmse_clean", "recon_rmse", "nfe_forward"]
    pd.testing.assert_frame_equal(on[same], off[same], check_exact=True)


def test_train_rnn_baseline_writes_none(runs_dir):
    s, _ = train(runs_dir, [*RNN, *CHECK], "rnn")
    assert s["status"] == "ok"
    for key in ("grad_rel_error_init", "grad_cosine_init", "grad_rel_error_final",
                "grad_cosine_final", "grad_check_time_s_init", "grad_check_time_s_final"):
        assert s[key] is None, key
