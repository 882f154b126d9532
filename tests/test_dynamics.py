"""Learning dynamical systems (seed 001): the ground-truth generators, sampling, the ODE-Nets and
the driver (train + report), all on CPU in seconds."""

from __future__ import annotations

import functools
import itertools
import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from nodebench.dynamics import (
    NETWORKS,
    SYSTEMS,
    GatedField,
    MLPField,
    make_network,
    make_system,
    n_params,
    nn_field_weights,
    sub_trajectories,
)
from nodebench.experiments import dynamics_report as report
from nodebench.instruments import NFECounter
from nodebench.models.blocks import Dynamics
from nodebench.solvers import Gradient, Solver, odesolve

F64 = torch.float64


@functools.cache
def _system(name: str, points: int):
    """Systems are read-only here: build each (name, points) once (the nonlinear ones cost a
    tight dopri5 solve)."""
    return make_system(name, points=points)


# --- linear systems: the matrix exponential ---------------------------------------------------

EXPECTED_A = {
    "spiral": [[-0.1, 2.0], [-2.0, -0.1]],
    "lotka_volterra": [[0.0, -3.0], [1.5, 0.0]],  # [[0, -b c / d], [d a / b, 0]], 1.5, 1, 3, 1
    "random_matrix": (torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
                      / 2).tolist(),
}


@pytest.mark.parametrize("name", ["spiral", "random_matrix", "lotka_volterra"])
def test_linear_generator_is_the_matrix_exponential(name):
    s = _system(name, 101)
    assert s.A is not None and torch.equal(s.A, torch.tensor(EXPECTED_A[name], dtype=F64))
    assert s.y.dtype == F64 and s.y.shape == (101, 2)
    assert s.y0.tolist() == list(SYSTEMS[name]["y0"])
    assert s.t[0].item() == SYSTEMS[name]["t"][0] and s.t[-1].item() == SYSTEMS[name]["t"][1]
    for k in (0, 1, 37, 100):  # one matrix exponential per point, row vector on the left
        expected = s.y0 @ torch.linalg.matrix_exp(s.A * (s.t[k] - s.t[0]))
        torch.testing.assert_close(s.y[k], expected, rtol=1e-12, atol=1e-12)
    # the field is dy/dt = y A (a row vector times A, not A y) and the closed form solves it:
    # its central difference in time equals the field at every tested point
    h = 1e-5
    for k in (3, 50, 97):
        tk, yk = s.t[k], s.y[k : k + 1]
        ahead = s.y0 @ torch.linalg.matrix_exp(s.A * (tk + h - s.t[0]))
        behind = s.y0 @ torch.linalg.matrix_exp(s.A * (tk - h - s.t[0]))
        slope = (ahead - behind)[None] / (2 * h)
        torch.testing.assert_close(slope, s.field(tk, yk), rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(s.field(tk, yk), yk @ s.A)


def test_lotka_volterra_is_the_seeds_linear_centre():
    s = _system("lotka_volterra", 11)
    eig = torch.linalg.eigvals(s.A)
    assert eig.real.abs().max() < 1e-12
    assert sorted(eig.imag.tolist()) == pytest.approx([-math.sqrt(4.5), math.sqrt(4.5)])
    period = 2 * math.pi / math.sqrt(4.5)
    back = s.y0 @ torch.linalg.matrix_exp(s.A * period)
    torch.testing.assert_close(back, s.y0, rtol=0, atol=1e-12)  # closed orbits


# --- nonlinear systems: a fine fixed-step rk4 reference ---------------------------------------

def _rk4(func, y0, t, substeps):
    """Classical rk4 with ``substeps`` equal steps between consecutive grid points."""
    out = [y0]
    y = y0
    for a, b in itertools.pairwise(t):
        h = (b - a) / substeps
        for i in range(substeps):
            s = a + i * h
            k1 = func(s, y)
            k2 = func(s + h / 2, y + h / 2 * k1)
            k3 = func(s + h / 2, y + h / 2 * k2)
            k4 = func(s + h, y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("name", ["nonlinear", "nn_field"])
def test_nonlinear_generator_matches_fine_rk4(name):
    s = _system(name, 61)
    assert s.A is None and s.y.shape == (61, 2)
    with torch.no_grad():
        ref = _rk4(s.field, s.y0[None], s.t, substeps=32)[:, 0]  # h = 0.013 (0.016 for nn_field)
    torch.testing.assert_close(s.y, ref, rtol=0, atol=1e-7)


def test_gated_field_is_the_seeds_linear_layers():
    A2 = torch.tensor([[-0.1, -0.5], [0.5, -0.1]], dtype=F64)
    B2 = torch.tensor([[0.2, 1.0], [-1.0, 0.2]], dtype=F64)
    c = torch.tensor([1.0, 1.0], dtype=F64)
    la = nn.Linear(2, 2, bias=False).double()
    lb = nn.Linear(2, 2, bias=False).double()
    la.weight.data.copy_(A2)
    lb.weight.data.copy_(B2)
    y = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    s = (y * c).sum(1, keepdim=True)
    expected = torch.sigmoid(s) * la(y - c) + torch.sigmoid(-s) * lb(y + c)
    field = _system("nonlinear", 61).field
    assert isinstance(field, GatedField)
    torch.testing.assert_close(field(torch.tensor(0.0), y), expected, rtol=1e-14, atol=1e-14)


def test_nn_field_is_a_bias_free_elu_mlp_of_y_times_t():
    weights = nn_field_weights(0)
    assert [tuple(w.shape) for w in weights] == [(25, 2), (50, 25), (10, 50), (2, 10)]
    for w in weights:  # PyTorch's default nn.Linear range U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert w.abs().max() <= 1 / math.sqrt(w.shape[1])
    assert all(torch.equal(a, b) for a, b in zip(weights, nn_field_weights(0)))
    assert not torch.equal(weights[0], nn_field_weights(1)[0])
    layers = [nn.Linear(w.shape[1], w.shape[0], bias=False).double() for w in weights]
    for layer, w in zip(layers, weights):
        layer.weight.data.copy_(w)
    y, t = torch.randn(5, 2, dtype=F64), torch.tensor(-3.5, dtype=F64)
    x = y * t
    for layer in layers:
        x = nn.functional.elu(layer(x))
    field = MLPField(weights)
    torch.testing.assert_close(field(t, y), x, rtol=1e-14, atol=1e-14)
    s = _system("nn_field", 61)
    assert s.t[0].item() == -15.0 and s.t[-1].item() == 15.0 and s.y0.tolist() == [1.0, 1.0]


# --- sampling and split -------------------------------------------------------------------

def test_irregular_sampling_is_deterministic_and_keeps_the_fraction():
    s = _system("spiral", 1000)
    assert torch.equal(s.observed("regular"), torch.arange(1000))
    a = s.observed("irregular", keep=0.5, seed=3)
    assert torch.equal(a, s.observed("irregular", keep=0.5, seed=3))
    assert not torch.equal(a, s.observed("irregular", keep=0.5, seed=4))
    assert len(a) == 500 and a[0] == 0
    assert torch.all(a[1:] > a[:-1]) and a[-1] < 1000  # sorted, distinct, on the grid
    gaps = (a[1:] - a[:-1]).unique()
    assert len(gaps) > 3  # uneven gaps: points are missing
    assert len(s.observed("irregular", keep=0.3, seed=0)) == 300
    with pytest.raises(ValueError):
        s.observed("sometimes")


def test_train_window_is_the_first_fraction_of_the_time_range():
    s = _system("spiral", 1000)  # t_k = 25 k / 999 <= 18.75  <=>  k <= 749
    assert s.train_end(0.75) == 750
    assert s.train_end(1.0) == 1000
    n = _system("nn_field", 61)  # t in [-15, 15], step 0.5: t <= 7.5 -> 46 points
    assert n.train_end(0.75) == 46


def test_minibatch_gathers_sub_trajectories_of_observed_points():
    obs = torch.tensor([0, 2, 3, 7, 8, 9, 12, 15])
    y = torch.arange(40.0).reshape(20, 2)
    y0, union, pos, target = sub_trajectories(obs, y, 3, 4, torch.Generator().manual_seed(0))
    assert y0.shape == (4, 2) and pos.shape == (4, 3) and target.shape == (4, 3, 2)
    assert union[0] == 0 and torch.all(union[1:] > union[:-1])
    for b in range(4):
        start = int(y0[b, 0].item()) // 2
        k = int((obs == start).nonzero())
        idx = obs[k:k + 3]
        assert torch.equal(union[pos[b]], idx - idx[0])
        assert torch.equal(target[b], y[idx])


# --- the ODE-Nets ----------------------------------------------------------------------------

def test_parameter_counts_and_initialisation():
    small, deep = make_network("small"), make_network("deep")
    assert n_params(small) == 2 * 50 + 50 + 50 * 2 + 2 == 252
    assert n_params(deep) == (2 * 150 + 150) + (150 * 50 + 50) + (50 * 50 + 50) + (50 * 2 + 2) \
        == 10652
    assert [m.out_features for m in deep.net if isinstance(m, nn.Linear)] == [150, 50, 50, 2]
    assert sum(isinstance(m, nn.Tanh) for m in deep.net) == 3
    assert isinstance(small, Dynamics)
    assert all(not m.bias.detach().any() for m in deep.net if isinstance(m, nn.Linear))
    assert set(NETWORKS) == {"small", "deep"}
    with pytest.raises(KeyError):
        make_network("huge")


def test_nfe_is_counted_on_the_learned_field():
    func = make_network("small")
    counter = NFECounter(func)
    with counter.phase_("forward"):
        odesolve(func, torch.ones(3, 2), torch.linspace(0, 1, 5), Solver("rk4", step_size=0.25),
                 Gradient("direct"))
    assert counter.take("forward") == 16  # 4 steps x 4 stages


# --- the preset through nodebench reproduce, and its report ------------------------------------

def test_solver_failure_ends_the_run_with_its_reason(tmp_path):
    """A step limit the solver cannot meet ends the trainer run as failed; the report counts it
    as a failure of the claim and names the reason."""
    from nodebench.config import compose
    from nodebench.train import run

    cfg = compose(["experiment=seed001_dynamics", "profile=tiny", "dataset.points=40",
                   "solver.rtol=1e-9", "solver.atol=1e-9", "solver.max_num_steps=1",
                   "trainer.progress=false", f"paths.runs={tmp_path}"])
    s = run(cfg, tmp_path / "runs" / "bad")
    assert s["status"] == "failed" and "max_num_steps exceeded" in s["error"]
    frame = report.load_runs(tmp_path / "runs")
    assert frame.iloc[0]["status"] == "failed" and pd.isna(frame.iloc[0]["fit_rel"])
    line = report.verdicts(frame)[0]
    assert line.startswith("- spiral, regular sampling: the seed's claim that the 2-50-2 "
                           "ODE-Net fits the spiral **does NOT reproduce**")
    assert "1 numerical failure(s)" in line


@pytest.mark.slow
def test_reproduce_tiny_end_to_end(runs_dir):
    """``nodebench reproduce seed001_dynamics profile=tiny``: 2 systems x 2 nets x 2 samplings
    through the trainer, and the report read from their run records only."""
    from nodebench.cli import main

    assert main(["reproduce", "seed001_dynamics", "profile=tiny"]) == 0
    runs, results = runs_dir / "seed001_dynamics-tiny", runs_dir / "dynamics-tiny-results"
    folders = sorted(p.parent.name.split("_", 1)[1] for p in runs.rglob("summary.json"))
    assert folders == sorted(f"{s}_ode_{n}_{m}_s0" for s in ("spiral", "nonlinear")
                             for n in ("small", "deep") for m in ("regular", "irregular"))
    for path in runs.rglob("summary.json"):
        s = json.loads(path.read_text())
        assert s["status"] == "ok", s["error"]
        assert s["iterations"] == 4 and s["nfe_forward"] > 0 and s["nfe_backward"] == 0
        assert s["fit_mse"] >= 0 and s["extrap_mse"] >= 0
        assert s["params"] == (252 if "_ode_small_" in path.parent.name else 10652)
        traj = torch.load(path.parent / "trajectory.pt", weights_only=True)
        assert traj["pred"].shape == traj["true"].shape == (60, 2)
        assert len(traj["observed"]) == (30 if "irregular" in path.parent.name else 60)
    for f in ("README.md", "dynamics.md", "dynamics.csv", "runs.csv", "spiral.png",
              "nonlinear.png", "errors.png"):
        assert (results / f).stat().st_size > 0, f
    table = (results / "dynamics.md").read_text()
    assert "| small (2-50-2 tanh) | 252 | regular | 1 / 0 |" in table
    assert "| deep (2-150-50-50-2 tanh) | 10652 | irregular | 1 / 0 |" in table
    assert "4 iterations per run" in table and "1 thread(s) per run" in table
    agg = pd.read_csv(results / "dynamics.csv")
    assert len(agg) == 8 and set(agg["ok"]) == {1}
    runs_csv = pd.read_csv(results / "runs.csv")
    one = runs_csv[(runs_csv["system"] == "spiral") & (runs_csv["network"] == "small")
                   & (runs_csv["sampling"] == "regular")].iloc[0]
    summary = json.loads((runs / one["run"] / "summary.json").read_text())
    assert one["fit_mse"] == pytest.approx(summary["fit_mse"])
    metrics = pd.read_csv(runs / one["run"] / "metrics.csv")
    assert one["nfe_forward"] == pytest.approx(metrics["nfe_forward"].mean())
    readme = (results / "README.md").read_text()
    # the verdicts are computed: one per claim and sampling for the systems that ran
    verdicts = [line for line in readme.splitlines() if line.startswith("- ")
                and "claim" in line]
    assert len(verdicts) == 2 * 2  # spiral (small), nonlinear (small), x 2 samplings
    # the report alone rebuilds the same tables from the run records
    before = (results / "dynamics.md").read_text()
    report.report(runs, results, "tiny")
    assert (results / "dynamics.md").read_text() == before


def test_report_without_runs_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dynamics run records"):
        report.report(tmp_path / "none", tmp_path / "results")
    assert not (tmp_path / "results").exists()
