"""Trajectory-length expressivity (seed 000): the measure, the models' equations, the driver."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from nodebench.experiments import expressivity as driver
from nodebench.expressivity import (
    CELLS,
    CTRNNCell,
    DeepNet,
    DeepNetDynamics,
    InputSignal,
    LTCCell,
    NeuralODECell,
    cell_trajectory,
    circle,
    gaussian_weights,
    node_layer_trajectories,
    pca_2d,
    trajectory_length,
)
from nodebench.instruments import NFECounter
from nodebench.models.blocks import Dynamics
from nodebench.solvers import Solver

F64 = torch.float64


# --- the measure ------------------------------------------------------------------------------

@pytest.mark.parametrize("radius", [0.5, 1.0, 3.0])
def test_circle_length_is_inscribed_polygon_and_tends_to_2_pi_r(radius):
    n = 401
    _, x = circle(n)
    length = float(trajectory_length(radius * x))
    # n samples with both ends at the same point: a regular (n-1)-gon inscribed in the circle
    assert length == pytest.approx(2 * (n - 1) * radius * math.sin(math.pi / (n - 1)), rel=1e-12)
    assert length == pytest.approx(2 * math.pi * radius, rel=1e-4)


def test_straight_segment_length_is_the_distance_whatever_the_sampling():
    a = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=F64)
    b = torch.tensor([4.0, 2.0, 0.5, 3.0, 12.0], dtype=F64)
    s = torch.rand(50, dtype=F64).sort().values
    s = torch.cat([s.new_zeros(1), s, s.new_ones(1)])
    line = a + s[:, None] * (b - a)
    assert float(trajectory_length(line)) == pytest.approx(13.0, rel=1e-12)  # |(3, 4, 0, 0, 12)|
    batched = torch.stack([line, 2 * line])  # (2, N, 5): one length per curve
    assert trajectory_length(batched).tolist() == pytest.approx([13.0, 26.0], rel=1e-12)


def test_pca_of_an_embedded_circle_keeps_its_shape_and_length():
    _, x = circle(257)
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=F64, generator=torch.Generator().manual_seed(1)))
    embedded = 2.0 * x @ q[:2] + torch.arange(10, dtype=F64)  # radius 2, rotated and shifted
    proj, frac = pca_2d(embedded)
    assert proj.shape == (257, 2)
    assert frac == pytest.approx(1.0, abs=1e-12)
    assert float(trajectory_length(proj)) == pytest.approx(float(trajectory_length(2.0 * x)),
                                                           rel=1e-10)


# --- random parameters ----------------------------------------------------------------------

@pytest.mark.parametrize("scaling, variance", [("fan_in", 2.0 / 50), ("none", 2.0)])
def test_weight_variance_follows_the_scaling(scaling, variance):
    w = gaussian_weights(40, 100, 50, 2.0, scaling, torch.Generator().manual_seed(0), F64)
    assert w.shape == (40, 100, 50)
    assert float(w.var()) == pytest.approx(variance, rel=0.02)  # 200k samples: std err 0.3%


# --- FFN and Neural ODE -----------------------------------------------------------------------

def test_deep_net_layers_by_hand():
    # one draw, two layers: W1 = [[1, 0], [0, -1]], b1 = (0, 1); W2 = [[1, 1], [0, 2]], b2 = 0
    w1 = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]], dtype=F64)
    w2 = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]], dtype=F64)
    b = [torch.tensor([[0.0, 1.0]], dtype=F64), torch.zeros(1, 2, dtype=F64)]
    net = DeepNet([w1, w2], b, "relu")
    x = torch.tensor([[[2.0, 3.0], [-1.0, -4.0]]], dtype=F64)  # (R=1, N=2, 2)
    a1, a2 = net.layers(x)
    assert a1.tolist() == [[[2.0, 0.0], [0.0, 5.0]]]  # relu((2, -3 + 1)), relu((-1, 4 + 1))
    assert a2.tolist() == [[[2.0, 0.0], [5.0, 10.0]]]


def test_neural_ode_with_a_constant_field_translates_the_circle():
    # all weights and biases 0: f = sigmoid(0) = 1/2 everywhere, so h(t) = h(0) + t/2: every
    # time slice is a translated circle of the same length
    width, depth = 6, 6
    net = DeepNet([torch.zeros(1, width, width, dtype=F64)] * depth,
                  [torch.zeros(1, width, dtype=F64)] * depth, "sigmoid")
    func = DeepNetDynamics(net)
    assert isinstance(func, Dynamics)
    _, x = circle(101)
    counter = NFECounter(func)
    with counter.phase_("forward"):
        layers = node_layer_trajectories(func, x[None], Solver("dopri5", 1e-6, 1e-6))
    nfe = counter.take("forward")
    assert len(layers) == depth
    for layer, h in enumerate(layers, start=1):
        assert torch.allclose(h[0, :, :2], x + layer / (2 * depth), atol=1e-9)
        assert torch.allclose(h[0, :, 2:], torch.full_like(h[0, :, 2:], layer / (2 * depth)),
                              atol=1e-9)
        assert float(trajectory_length(h[0])) == pytest.approx(float(trajectory_length(x)))
    assert nfe >= 2 and (nfe - 2) % 6 == 0  # torchdiffeq's dopri5: 2 + 6 per attempted step


# --- single-layer cells -----------------------------------------------------------------------

def _cell(cls, k=3, w=None, u=None, b=None, act="tanh", tau=1.0, **extra):
    t, x = circle(5)  # samples at t = 0, pi/2, pi, 3 pi/2, 2 pi
    w = torch.zeros(1, k, k, dtype=F64) if w is None else w
    u = torch.zeros(1, k, 2, dtype=F64) if u is None else u
    b = torch.zeros(1, k, dtype=F64) if b is None else b
    return cls(w, u, b, act, InputSignal(t, x), tau=tau, **extra)


def test_input_signal_interpolates_linearly_between_samples():
    sig = _cell(NeuralODECell).signal
    assert sig(torch.tensor(math.pi / 2, dtype=F64)).tolist() == pytest.approx([1.0, 0.0], abs=1e-15)
    assert sig(torch.tensor(math.pi / 4, dtype=F64)).tolist() == pytest.approx([0.5, 0.5])
    assert sig(torch.tensor(2 * math.pi, dtype=F64)).tolist() == pytest.approx([0.0, 1.0], abs=1e-15)


def test_cell_equations_with_w_zero_by_hand():
    b = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    u = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]]], dtype=F64)
    a = torch.tensor([[1.0, 2.0, -3.0]], dtype=F64)
    h = torch.tensor([[0.3, -0.2, 1.5]], dtype=F64)
    t = torch.tensor(math.pi / 2, dtype=F64)  # x = (1, 0): U x + b = (1.5, -1.0, 4.0)
    f = torch.tanh(torch.tensor([[1.5, -1.0, 4.0]], dtype=F64))
    tau = 0.5
    assert torch.allclose(_cell(NeuralODECell, u=u, b=b)(t, h), f)
    assert torch.allclose(_cell(CTRNNCell, u=u, b=b, tau=tau)(t, h), -h / tau + f)
    assert torch.allclose(_cell(LTCCell, u=u, b=b, tau=tau, a=a)(t, h), -(1 / tau + f) * h + f * a)
    relu = _cell(LTCCell, u=u, b=b, tau=tau, a=a, act="relu")(t, h)
    g = torch.tensor([[1.5, 0.0, 4.0]], dtype=F64)
    assert torch.allclose(relu, -(1 / tau + g) * h + g * a)


def test_cell_solutions_with_constant_synapse_match_closed_forms():
    # W = U = 0: f = tanh(b) is constant and each cell is linear with a closed-form solution
    b = torch.tensor([[0.7, -0.4]], dtype=F64)
    a = torch.tensor([[2.0, 1.0]], dtype=F64)
    f = torch.tanh(b)
    tau = 2.0
    t, x = circle(629)
    sig = InputSignal(t, x)
    zeros_w, zeros_u = torch.zeros(1, 2, 2, dtype=F64), torch.zeros(1, 2, 2, dtype=F64)
    solver = Solver("rk4", step_size=float(t[1] - t[0]))
    tt = t[:, None]
    expected = {
        NeuralODECell: f * tt,
        CTRNNCell: tau * f * (1 - torch.exp(-tt / tau)),
        LTCCell: f * a / (1 / tau + f) * (1 - torch.exp(-(1 / tau + f) * tt)),
    }
    for cls, h_exact in expected.items():
        extra = {"a": a} if cls is LTCCell else {}
        cell = cls(zeros_w, zeros_u, b, "tanh", sig, tau=tau, **extra)
        counter = NFECounter(cell)
        with counter.phase_("forward"):
            h = cell_trajectory(cell, t, solver)
        assert counter.take("forward") == 4 * (len(t) - 1)  # rk4: 4 evaluations per grid step
        assert h.shape == (1, len(t), 2)
        assert torch.allclose(h[0], h_exact, atol=1e-9), cls.__name__
        if cls is not LTCCell:  # one rate for all units: a straight segment from 0 to h(2 pi)
            assert float(trajectory_length(h[0])) == pytest.approx(float(h_exact[-1].norm()),
                                                                   rel=1e-9)


def test_random_cells_are_dynamics_with_the_seed_shapes():
    t, x = circle(9)
    sig = InputSignal(t, x)
    for name, cls in CELLS.items():
        cell = cls.random(3, 7, sig, "relu", 2.0, 1.0, "fan_in", torch.Generator().manual_seed(0))
        assert isinstance(cell, Dynamics), name
        assert cell.w.shape == (3, 7, 7) and cell.u.shape == (3, 7, 2) and cell.b.shape == (3, 7)
    assert LTCCell.random(3, 7, sig, "relu", 2.0, 1.0, "none",
                          torch.Generator().manual_seed(0)).a.shape == (3, 7)


# --- the driver -------------------------------------------------------------------------------

def test_tiny_profile_end_to_end(runs_dir):
    """`nodebench reproduce seed000_expressivity profile=tiny`: no sweep, the two measurement
    stages into the run folder, the report from their files; the report alone gives the same
    tables again."""
    from nodebench.cli import main
    from nodebench.config import compose

    assert main(["reproduce", "seed000_expressivity", "profile=tiny"]) == 0
    runs, results = runs_dir / "seed000_expressivity-tiny", runs_dir / "expressivity-tiny-results"
    assert not list(runs.rglob("summary.json"))          # nothing was trained
    assert not (results / "reproduce.json").exists()    # nor timed as a training sweep
    p = compose(["experiment=seed000_expressivity", "profile=tiny"]).expressivity
    assert (p.points, p.draws, p.deep_width) == (33, 2, 8)
    assert compose(["experiment=seed000_expressivity", "profile=paper"]).expressivity.points == 4000
    assert compose(["experiment=seed000_expressivity"]).expressivity.deep_draws == 5
    depth = pd.read_csv(results / "depth_draws.csv")
    n_deep = sum(len(v) for v in p["deep_activations"].values())
    assert len(depth) == n_deep * 2 * (p["depth"] + 1) * p["draws"]
    assert (depth["status"] == "ok").all()
    # layer 0 is the input circle for both models: the same length
    assert depth[depth["layer"] == 0]["length"].nunique() == 1
    cells = pd.read_csv(results / "cells_draws.csv")
    assert len(cells) == len(p["scalings"]) * len(p["activations"]) * len(CELLS) \
        * len(p["widths"]) * p["draws"]
    assert set(cells["nfe"]) == {4 * (p["points"] - 1)}
    for name in ("README.md", "depth_lengths.md", "depth_lengths.csv", "cells_lengths.md",
                 "cells_lengths.csv", "depth_length.png", "cells_length.png",
                 "depth_projections_none.png", "cells_projections_fan_in.png"):
        assert (results / name).stat().st_size > 0, name
    readme = (results / "README.md").read_text()
    assert "Claims of the seed vs what was measured" in readme and "LTC length" in readme
    assert "profile `tiny`" in readme
    tables = {f: (results / f).read_bytes() for f in ("depth_lengths.md", "cells_lengths.csv")}
    driver.report_stage(runs, results, "tiny")
    assert tables == {f: (results / f).read_bytes() for f in tables}
