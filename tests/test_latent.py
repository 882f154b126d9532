"""Latent ODE vs RNN on spirals (Chen et al. 2018, Table 2): data, loss terms, metric, models,
driver."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from nodebench.errors import ConfigError
from nodebench.experiments import latent as driver
from nodebench.instruments import NFECounter
from nodebench.latent import (
    Decoder,
    LatentDynamics,
    LatentODE,
    RecognitionRNN,
    RNNBaseline,
    SpiralConfig,
    build_model,
    count_parameters,
    extrapolation_breakdown,
    gaps_since_previous,
    gaussian_log_likelihood,
    gaussian_nll,
    kl_standard_normal,
    make_spirals,
    observe,
    predict,
    rmse,
    spiral_dataset,
    subsample,
)
from nodebench.models.blocks import Dynamics
from nodebench.solvers import Gradient, Solver

SMALL = SpiralConfig(n_spirals=40, n_train=30)
DOPRI = Solver("dopri5", rtol=1e-3, atol=1e-4, max_num_steps=1000)


# --- the spirals ------------------------------------------------------------------------------

def test_spiral_sizes_split_and_grid():
    s = make_spirals(SMALL, 0)
    steps = SMALL.n_window + SMALL.n_extrap
    assert s.t.shape == (steps,) and s.clean.shape == s.noisy.shape == (40, steps, 2)
    assert torch.allclose(s.t, torch.arange(steps) * SMALL.dt)
    assert (s.train, s.test) == (slice(0, 30), slice(30, 40))
    assert s.noisy[s.test][:, s.extrap].shape == (10, SMALL.n_extrap, 2)
    assert s.t[s.window][-1] < s.t[s.extrap][0]


def test_half_of_the_spirals_turn_clockwise_with_the_stated_angular_speed():
    s = make_spirals(SMALL, 3)
    assert int((s.direction == -1).sum()) == int((s.direction == 1).sum()) == 20
    a, b = s.clean[:, :-1], s.clean[:, 1:]
    cross = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]  # > 0: counter-clockwise step
    assert torch.equal(torch.sign(cross), s.direction[:, None].expand_as(cross))
    step = torch.atan2(cross, (a * b).sum(-1))  # signed angle turned per grid step
    omega = 2 * math.pi * SMALL.turns / (SMALL.n_window * SMALL.dt)
    assert torch.allclose(step, s.direction[:, None] * omega * SMALL.dt, atol=1e-5)
    both = s.direction[s.train].unique().tolist(), s.direction[s.test].unique().tolist()
    assert both == ([-1.0, 1.0], [-1.0, 1.0])  # both kinds in train and in test


def test_radius_grows_linearly_with_the_angle_turned():
    s = make_spirals(SMALL, 1)
    radius = s.clean.norm(dim=-1)
    expected = s.r0[:, None] + SMALL.growth * SMALL.omega * s.t
    assert torch.allclose(radius, expected, atol=1e-5)
    assert bool((radius[:, 1:] > radius[:, :-1]).all())
    assert float(s.r0.min()) >= SMALL.r_min and float(s.r0.max()) <= SMALL.r_max
    assert torch.allclose(s.clean[:, 0], s.r0[:, None] * torch.stack(
        [s.phi0.cos(), s.phi0.sin()], -1), atol=1e-5)


def test_two_spirals_family_puts_every_spiral_on_one_of_two_curves():
    """Chen et al. 2018 section 5.1: each spiral starts at a different point of a clockwise and a
    counter-clockwise spiral; independently drawn start angles put no two on one curve."""
    s = make_spirals(SpiralConfig(n_spirals=40, n_train=30, family="two_spirals"), 2)
    theta = (s.clean.norm(dim=-1) - SMALL.r_min) / SMALL.growth      # the curve's angle
    phi = torch.atan2(s.clean[..., 1], s.clean[..., 0])
    on_curve = torch.remainder(phi - s.direction[:, None] * theta + math.pi, 2 * math.pi) - math.pi
    assert float(on_curve.abs().max()) < 1e-4
    other = make_spirals(SMALL, 2)                                       # independent
    assert torch.equal(other.direction, s.direction) and torch.equal(other.r0, s.r0)
    assert torch.allclose(other.noisy - other.clean, s.noisy - s.clean, atol=1e-6)  # same noise
    off = torch.remainder(other.phi0 - other.direction * (other.r0 - SMALL.r_min) / SMALL.growth
                          + math.pi, 2 * math.pi) - math.pi
    assert float(off.abs().max()) > 1.0 and 0 <= float(other.phi0.min()) < 2 * math.pi


@pytest.mark.parametrize("bad", [{"family": "helix"}, {"family": "two_spirals", "growth": 0.0}])
def test_bad_spiral_family_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="family"):
        spiral_dataset(n_obs=30, seed=0, n_spirals=40, n_train=30, **bad)


def test_noise_level_and_determinism_by_seed():
    a, b, c = make_spirals(SMALL, 7), make_spirals(SMALL, 7), make_spirals(SMALL, 8)
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.direction, b.direction)
    assert not torch.equal(a.noisy, c.noisy)
    assert float((a.noisy - a.clean).std()) == pytest.approx(SMALL.noise, rel=0.05)  # 16k draws
    loud = make_spirals(SpiralConfig(n_spirals=40, n_train=30, noise=0.3), 7)
    assert float((loud.noisy - loud.clean).std()) == pytest.approx(0.3, rel=0.05)
    assert torch.equal(loud.clean, a.clean)  # the noise level does not move the curves


@pytest.mark.parametrize("n", [1, 30, 50, 100])
def test_subsample_without_replacement_sorted_and_seeded(n):
    idx = subsample(200, 100, n, torch.Generator().manual_seed(0))
    assert idx.shape == (200, n)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # strictly increasing: sorted, no repeats
    assert int(idx.min()) >= 0 and int(idx.max()) <= 99
    again = subsample(200, 100, n, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    if n == 100:
        assert torch.equal(idx, torch.arange(100).expand(200, -1))
    if n == 30:  # rows differ from each other: drawn per spiral
        assert len({tuple(r) for r in idx.tolist()}) > 190
    with pytest.raises(ValueError):
        subsample(2, 100, 101, torch.Generator())


def test_observe_gathers_the_noisy_points_at_their_times():
    s = make_spirals(SMALL, 0)
    o = observe(s, 30, 0)
    assert torch.equal(o.idx, observe(s, 30, 0).idx)
    assert not torch.equal(o.idx, observe(s, 30, 1).idx)
    i, k = 5, 11
    j = int(o.idx[i, k])
    assert torch.equal(o.x[i, k], s.noisy[i, j]) and float(o.t[i, k]) == float(s.t[j])
    assert gaps_since_previous(o.t[:1]).tolist()[0][0] == pytest.approx(float(o.t[0, 0]))


# --- metric and loss terms --------------------------------------------------------------------

def test_rmse_is_pooled_over_spirals_points_and_coordinates():
    target = torch.zeros(2, 2, 2)
    pred = torch.zeros(2, 2, 2)
    pred[0] = 2.0  # spiral 0: every error 2; spiral 1: no error
    # pooled: sqrt(4 * 2^2 / 8) = sqrt(2); a mean of per-spiral RMSEs would give (2 + 0) / 2 = 1
    assert rmse(pred, target) == pytest.approx(math.sqrt(2.0))
    assert rmse(torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.zeros(2, 2)) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        rmse(torch.zeros(2, 3), torch.zeros(3, 2))


def test_extrapolation_breakdown_separates_a_few_far_off_spirals():
    target = torch.zeros(4, 5, 2)
    pred = torch.full((4, 5, 2), 0.1)       # every spiral off by 0.1 ...
    pred[0] = 2.0                           # ... but spiral 0 (clockwise) by 2
    direction = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    out = extrapolation_breakdown(pred, target, direction, threshold=0.3)
    assert out["test_rmse_median"] == pytest.approx(0.1)
    assert out["test_rmse_cw"] == pytest.approx(math.sqrt((4.0 + 0.01) / 2))
    assert out["test_rmse_ccw"] == pytest.approx(0.1)
    assert out["test_failed_share"] == pytest.approx(0.25)
    assert rmse(pred, target) == pytest.approx(math.sqrt((4.0 + 3 * 0.01) / 4))
    only_ccw = extrapolation_breakdown(pred[2:], target[2:], direction[2:], threshold=0.3)
    assert only_ccw["test_rmse_cw"] is None and only_ccw["test_failed_share"] == 0.0
    with pytest.raises(ValueError):
        extrapolation_breakdown(pred, target, direction[:3], threshold=0.3)


def test_kl_against_the_standard_normal_in_closed_form():
    # mu = 1, sigma = 2: 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2) = 0.5 * (4 - log 4)
    kl = kl_standard_normal(torch.tensor([1.0]), torch.tensor([math.log(4.0)]))
    assert float(kl) == pytest.approx(0.5 * (4 - math.log(4.0)))
    assert float(kl) == pytest.approx(1.3068528194)
    two = kl_standard_normal(torch.tensor([[1.0, 0.0]]), torch.tensor([[math.log(4.0), 0.0]]))
    assert two.shape == (1,) and float(two) == pytest.approx(1.3068528194)  # N(0,1) adds 0
    assert float(kl_standard_normal(torch.zeros(3), torch.zeros(3))) == 0.0


def test_gaussian_log_likelihood_and_nll_of_known_values():
    # log N(1; 0, 0.5^2) = -0.5 log(2 pi) - log 0.5 - 0.5 * (1 / 0.5)^2
    ll = gaussian_log_likelihood(torch.tensor(1.0), torch.tensor(0.0), 0.5)
    assert float(ll) == pytest.approx(-0.9189385332 + 0.6931471806 - 2.0)
    assert float(ll) == pytest.approx(-2.2257913526)
    assert float(gaussian_log_likelihood(torch.tensor(3.0), torch.tensor(3.0), 1.0)) == \
        pytest.approx(-0.5 * math.log(2 * math.pi))
    nll = gaussian_nll(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(math.log(0.25)))
    assert float(nll) == pytest.approx(2.2257913526)


def test_elbo_assembles_the_terms_per_spiral():
    # decoder constant (0.5, -1), encoder constant q(z0) = N((1, 0, 0, 0), diag(4, 1, 1, 1)):
    # the ELBO is known whatever z0 is drawn
    torch.manual_seed(0)
    model = LatentODE(DOPRI, Gradient("direct"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.decoder.net[2].bias.copy_(torch.tensor([0.5, -1.0]))
        model.encoder.out.bias.copy_(torch.tensor([1.0, 0, 0, 0, math.log(4.0), 0, 0, 0]))
    s = make_spirals(SMALL, 0)
    o = observe(s, 30, 0)[slice(0, 3)]
    loglik, kl = model.elbo(o.x, o.t, o.idx, s.t[s.window], 0.1)
    expected = gaussian_log_likelihood(o.x, torch.tensor([0.5, -1.0]), 0.1).sum(dim=(1, 2))
    assert loglik.shape == kl.shape == (3,)
    assert torch.allclose(loglik, expected)
    assert torch.allclose(kl, torch.full((3,), 0.5 * (4 - math.log(4.0))))


# --- the models -------------------------------------------------------------------------------

def test_parameter_counts():
    # dynamics 4-20-4: (4*20 + 20) + (20*4 + 4); decoder 4-20-2: 100 + (20*2 + 2)
    assert count_parameters(LatentDynamics()) == 184
    assert count_parameters(LatentDynamics(layers=2)) == 184 + 20 * 20 + 20   # torchdiffeq's
    assert count_parameters(Decoder()) == 142
    # GRU, input 2 + gap, 25 units: 3 gates x (25*3 + 25*25 + 25 + 25) = 2250; read-out 25 -> 8
    assert count_parameters(RecognitionRNN()) == 2250 + 208
    assert count_parameters(RecognitionRNN(cell="elman")) == (75 + 625 + 50) + 208
    assert count_parameters(build_model("latent_ode", DOPRI, Gradient("direct"))) == 2784
    two = build_model("latent_ode", DOPRI, Gradient("direct"), dyn_layers=2)
    assert count_parameters(two) == 2784 + 420
    # baselines: GRU 25 (input 2: 3 x (50 + 625 + 50) = 2175; with the gap 2250) + head 25 -> 4
    assert count_parameters(build_model("rnn")) == 2175 + 104
    assert count_parameters(build_model("rnn_dt")) == 2250 + 104
    assert count_parameters(build_model("rnn", cell="elman")) == 725 + 104
    assert count_parameters(build_model("rnn_dt", cell="elman")) == 750 + 104
    with pytest.raises(ValueError):
        build_model("lstm")
    with pytest.raises(ValueError):
        build_model("rnn", cell="lstm")


def test_latent_ode_solves_on_the_grid_and_counts_nfe():
    torch.manual_seed(0)
    model = build_model("latent_ode", DOPRI, Gradient("direct"))
    assert isinstance(model.func, Dynamics)
    s = make_spirals(SMALL, 0)
    o = observe(s, 50, 0)
    counter = NFECounter(model)
    with counter.phase_("forward"):
        p = predict(model, s, o, s.test)
    nfe = counter.take("forward")
    assert nfe >= 8 and (nfe - 2) % 6 == 0  # torchdiffeq's dopri5: 2 + 6 per attempted step
    assert p["grid"].shape == (10, 200, 2) and p["extrap"].shape == (10, 100, 2)
    assert p["recon"].shape == p["recon_target"].shape == (10, 50, 2)
    assert torch.equal(p["extrap"], p["grid"][:, 100:])
    k = 3  # the reconstruction is the decoded grid at each spiral's observed indices
    assert torch.equal(p["recon"][k], p["grid"][k, o.idx[30 + k]])


def test_rnn_baselines_predict_next_points_and_roll_forward():
    torch.manual_seed(0)
    s = make_spirals(SMALL, 0)
    o = observe(s, 30, 0)
    future = s.t[s.extrap]
    for name in ("rnn", "rnn_dt"):
        net = build_model(name)
        recon, extrap = net.predict(o.x[:4], o.t[:4], future)
        assert recon.shape == (4, 29, 2) and extrap.shape == (4, 100, 2)
        mean, logvar, _ = net.step(o.x[:4, :-1], o.t[:4, 1:] - o.t[:4, :-1])
        assert torch.allclose(recon, mean)
        nll = net.nll(o.x[:4], o.t[:4]).detach()
        assert float(nll) == pytest.approx(float(gaussian_nll(o.x[:4, 1:], mean, logvar)
                                                 .sum(-1).mean().detach()), rel=1e-6)
    # only the time-gap variant sees the spacing of the future times
    dt_net, plain = build_model("rnn_dt"), build_model("rnn")
    stretched = future[0] + 2 * (future - future[0])
    assert not torch.allclose(dt_net.predict(o.x[:2], o.t[:2], future)[1],
                              dt_net.predict(o.x[:2], o.t[:2], stretched)[1])
    assert torch.equal(plain.predict(o.x[:2], o.t[:2], future)[1],
                       plain.predict(o.x[:2], o.t[:2], stretched)[1])
    assert isinstance(dt_net, RNNBaseline) and dt_net.time_gaps and not plain.time_gaps


# --- the reproduction (nodebench reproduce chen2018_table2: nodebench train runs + the report) ---

def test_tiny_reproduction_end_to_end(runs_dir, capsys):
    from nodebench.cli import main

    assert main(["reproduce", "chen2018_table2", "profile=tiny"]) == 0
    runs, results = runs_dir / "chen2018_table2-tiny", runs_dir / "latent-tiny-results"
    summaries = {(s["model"], s["config"]["dataset"]["n_obs"]): s
                 for s in (json.loads(p.read_text()) for p in runs.rglob("summary.json"))}
    assert sorted(summaries) == sorted((m, n) for m in ("rnn", "rnn_dt", "latent_ode")
                                       for n in (30, 100))
    s = summaries[("latent_ode", 30)]
    assert s["status"] == "ok" and s["task"] == "latent" and s["iterations"] == 2 * 3
    # the preset's spirals turn 0.3 of a turn per window (the authors' example); the data set's
    # default stays half a turn
    assert s["config"]["dataset"]["turns"] == 0.3 and SpiralConfig().turns == 0.5
    assert s["params"] == 2784 and s["nfe_forward"] > 0 and s["nfe_backward"] == 0
    assert 0 < s["test_rmse"] < 10 and 0 < s["recon_rmse"] < 10
    assert 0 < s["test_rmse_median"] and 0 <= s["test_failed_share"] <= 1
    assert s["test_rmse_cw"] is not None and s["test_rmse_ccw"] is not None
    pred = torch.load(next(runs.glob("*rnn_s0")) / "predictions.pt")
    assert pred["extrap"].shape == (2, 100, 2)
    for name in ("README.md", "table2.md", "table2.csv", "table2_noise_free.csv", "details.md",
                 "details.csv", "runs.csv", "spirals.png", "curves.png", "table.md",
                 "breakdown.csv"):
        assert (results / name).stat().st_size > 0, name
    table = (results / "table2.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| ")]
    assert rows[0] == "| model | source | n = 30 | n = 100 |"
    measured = [r for r in rows if "measured" in r]
    paper = [r for r in rows if "**paper**" in r]
    assert [r.split(" | ")[0] for r in measured] == ["| RNN", "| RNN + time gaps",
                                                     "| Latent ODE"]
    assert all("(1 seed)" in r for r in measured)
    assert "0.3937 | 0.1813" in paper[0] and "0.1642 | 0.1346" in paper[1]
    assert "Budget (profile `tiny`)" in table and "noise std 0.1" in table
    assert "- Latent ODE at n = 30: test RMSE" in (results / "README.md").read_text()
    assert "### Where the extrapolation error comes from" in (results / "README.md").read_text()
    assert len(pd.read_csv(results / "breakdown.csv")) == 6
    csv = pd.read_csv(results / "table2.csv")
    assert len(csv[csv["source"] == "measured"]) == 6 and len(csv[csv["source"] == "paper"]) == 4
    # the report alone rebuilds the same table from the run records
    assert driver.report(runs, results, "tiny")
    assert (results / "table2.md").read_text() == table


def test_solver_failure_is_recorded(runs_dir, monkeypatch):
    from nodebench.cli import main

    # dynamics that return NaN: dopri5's step size becomes NaN ("underflow in dt nan")
    monkeypatch.setattr(LatentDynamics, "forward",
                        lambda self, t, z: torch.full_like(z, float("nan")))
    run_dir = runs_dir / "failed"
    assert main(["train", "experiment=chen2018_table2", "profile=tiny",
                 f"hydra.run.dir={run_dir}"]) == 1
    failed = json.loads((run_dir / "summary.json").read_text())
    assert failed["status"] == "failed" and "underflow in dt" in failed["error"]
    assert failed["test_rmse"] is None and not (run_dir / "predictions.pt").exists()
    results = runs_dir / "results"
    assert driver.report(runs_dir, results, "tiny")
    assert "(1 of 1 failed)" in (results / "table2.md").read_text()
    assert "underflow in dt" in (results / "README.md").read_text()


def test_verdicts_against_the_targets():
    frame = pd.DataFrame([
        {"model": "latent_ode", "n": 30, "status": "ok", "test_rmse": 0.19},
        {"model": "latent_ode", "n": 30, "status": "ok", "test_rmse": 0.20},
        {"model": "latent_ode", "n": 100, "status": "ok", "test_rmse": 0.25},
        {"model": "latent_ode", "n": 100, "status": "failed", "test_rmse": None},
        {"model": "rnn", "n": 30, "status": "ok", "test_rmse": 0.40},
        {"model": "rnn_dt", "n": 30, "status": "ok", "test_rmse": 0.25}])
    out = driver.verdicts(frame)
    assert out[0] == "Latent ODE at n = 30: test RMSE 0.1950 against at most 0.20: met."
    assert out[1].startswith("Latent ODE at n = 100: test RMSE 0.2500") and "NOT met" in out[1]
    assert out[2].startswith("RNN at n = 30: 2.05x") and out[2].endswith(" met.")
    assert out[3].startswith("RNN + time gaps at n = 30: 1.28x") and "NOT met" in out[3]


def test_report_without_runs_says_so(tmp_path, capsys):
    assert not driver.report(tmp_path / "r", tmp_path / "x", "tiny")
    assert "no latent run records" in capsys.readouterr().err


def test_the_driver_has_no_loop_no_options_no_profiles():
    assert not any(hasattr(driver, name) for name in ("main", "PROFILES", "train_one",
                                                      "stage_train"))
