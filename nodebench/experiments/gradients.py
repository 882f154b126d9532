"""The gradient-mode study (issue 14): ``nodebench reproduce gradient_modes`` (`make
reproduce-gradients`).

The six ways nodebench differentiates through an ODE solve (``gradient_mode=direct``,
``adjoint``, ``seminorm``, ``checkpointed``, ``aca``, ``mali``; conf/gradient_mode/,
:mod:`nodebench.gradients`, reference.md section 6) on the Table-1 ODE-Net on MNIST and on
ANODE's 2-D annulus (Dupont et al. 2019, Section 3), with the same data, seeds, optimiser and
tolerance (dopri5, rtol = atol = 1e-3; MALI its own ALF integrator at the same tolerance).

The preset (conf/experiment/gradient_modes.yaml) trains every mode through ``nodebench train``
(two sweep parts: MNIST and the annulus), each run measuring its gradient error at initialisation
and at the end (``trainer.instruments.gradient_error``); then :func:`tolerance_stage` measures the
gradient error against the solver tolerance at initialisation, and
:mod:`nodebench.experiments.gradients_report` writes the tables and figures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

#: the modes of the study, in the report's order (conf/gradient_mode/<mode>.yaml)
MODES: tuple[str, ...] = ("direct", "adjoint", "seminorm", "checkpointed", "aca", "mali")

# What the literature says about each mode (reference.md section 6), beside the measurements.
CLAIMS = {
    "direct": "exact gradient of the discrete solve; memory O(NFE x activations) (Chen 2018)",
    "adjoint": "O(1) memory; backsolve reconstructs the state, so its gradient is inexact "
               "(Gholami 2019: 47.37 % vs 77.30 % CIFAR-10 accuracy against checkpointed)",
    "seminorm": "same gradient as the adjoint with up to 62 % fewer backward NFE (Kidger 2021)",
    "checkpointed": "exact discrete gradient, memory O(steps x state) (diffrax's default)",
    "aca": "exact discrete gradient; CIFAR-10 ODE-ResNet18 about 5 % error vs 10 % for adjoint "
           "(Zhuang 2020)",
    "mali": "exact discrete gradient of a reversible integrator at O(state) memory (Zhuang 2021)",
}


def mode_of(config: dict[str, Any]) -> str | None:
    """The study's mode name of a run's resolved config (summary.json ``config``):
    ``model.gradient``, or ``seminorm`` for the adjoint with ``adjoint.norm=seminorm``; None for
    a model without a gradient mode."""
    mode = (config.get("model") or {}).get("gradient")
    if mode == "adjoint" and (config.get("adjoint") or {}).get("norm") == "seminorm":
        return "seminorm"
    return mode


def _num(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def _case(overrides: list[str], seed: int):
    """The model at initialisation and the task of one tolerance case, built as ``nodebench
    train`` builds them (the same seed, then the data, then the model: the runs' initial
    weights)."""
    from .. import config as C
    from ..train import seed_everything

    cfg = C.compose([*overrides, f"seed={seed}"])
    C.validate(cfg)
    seed_everything(seed, False)
    task = C.build_task(cfg)
    return C.build_model(cfg, inputs=C.model_inputs(cfg)), task


def tolerance_stage(runs: Path, results: Path, cfg) -> None:
    """``reproduce.after`` stage: the gradient error against the tolerance at initialisation.

    For each case of ``gradients.tolerance.cases`` (name -> ``{overrides, batch}``: the model
    and data, composed like a run of the sweep, seed 0), each mode of
    ``gradients.tolerance.modes`` and each rtol = atol in ``gradients.tolerance.tols``, the ODE
    blocks' solver is dopri5 at that tolerance (MALI: its ALF at that tolerance) and the
    parameter gradient of the task's loss on the first ``batch`` test items is compared with one
    float64 dopri5 1e-9 direct-backprop reference of the same weights (relative error in the
    2-norm, cosine). Writes ``results/tolerance.csv`` (columns: model, mode, tol, rel_error,
    cosine, nfe_forward, nfe_backward, failure, seconds). A solve that fails (step limit,
    underflow) is recorded in ``failure``, not raised.
    """
    import pandas as pd
    from omegaconf import OmegaConf

    from ..instruments import NFECounter
    from ..solvers import Gradient, Solver
    from ..validity import _dtype, _flat_grad, reference_model, solve_modules

    spec = OmegaConf.to_container(cfg.gradients.tolerance, resolve=True)
    rows = []
    for name, case in spec["cases"].items():
        net, task = _case(list(case["overrides"]), 0)
        objective = task.check_objective(int(case["batch"]))  # the trainer's check loss
        params = [p for p in net.parameters() if p.requires_grad]
        watch = time.perf_counter()
        ref = reference_model(net)
        ref_params = [p for p in ref.parameters() if p.requires_grad]
        g_ref = _flat_grad(torch.autograd.grad(objective(ref, torch.float64), ref_params,
                                               allow_unused=True), ref_params)
        norm_ref = torch.linalg.vector_norm(g_ref).item()
        print(f"[tolerance] {name}: float64 1e-9 reference in {time.perf_counter() - watch:.0f} s",
              flush=True)
        nfe = NFECounter(net)
        for mode in spec["modes"]:
            fields = ({"mode": "adjoint", "norm": "seminorm"} if mode == "seminorm"
                      else {"mode": mode})
            for tol in spec["tols"]:
                for block in solve_modules(net):
                    block.solver = Solver(method="dopri5", rtol=tol, atol=tol,
                                          max_num_steps=100_000)
                    block.gradient = Gradient(**fields)
                row = {"model": name, "mode": mode, "tol": tol, "rel_error": None,
                       "cosine": None, "nfe_forward": None, "nfe_backward": None,
                       "failure": None}
                watch = time.perf_counter()
                try:
                    with nfe.phase_("forward"):
                        loss = objective(net, _dtype(net))
                    with nfe.phase_("backward"):
                        g = _flat_grad(torch.autograd.grad(loss, params, allow_unused=True),
                                       params)
                    row.update(
                        rel_error=torch.linalg.vector_norm(g - g_ref).item() / norm_ref,
                        cosine=(torch.dot(g, g_ref) / (torch.linalg.vector_norm(g) * norm_ref)
                                ).item(),
                        nfe_forward=nfe.take("forward"), nfe_backward=nfe.take("backward"))
                except (AssertionError, RuntimeError) as exc:
                    row["failure"] = str(exc).splitlines()[0][:120]
                    nfe.take("forward"), nfe.take("backward")
                row["seconds"] = time.perf_counter() - watch
                rows.append(row)
                print(f"[tolerance] {name} {mode:12s} tol {tol:.0e}: rel error "
                      f"{_num(row['rel_error'])} NFE {row['nfe_forward']}/{row['nfe_backward']} "
                      f"({row['seconds']:.1f} s)", flush=True)
        nfe.remove()
    results.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(results / "tolerance.csv", index=False)
