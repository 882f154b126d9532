"""CNF and planar NF through the one trainer (issue 17): the density-matching and maximum-
likelihood tasks against closed forms, the CNF's solve checks in the run record, the presets'
reports, bad input."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from nodebench.cli import main
from nodebench.cnf import (
    CNF,
    DensityTarget,
    LinearField,
    density_matching_loss,
    density_target,
    log_normal,
    planar_cnf,
    point_samples,
)
from nodebench.regularisers import Penalties
from nodebench.solvers import Gradient, Solver
from nodebench.tasks import DensityMatching, MaximumLikelihood


def _identity() -> CNF:
    """The identity flow: a linear CNF with A = 0 (float32, exact)."""
    return CNF(LinearField(torch.zeros(2, 2)), Solver("dopri5"), Gradient("direct"))


def _gaussian_target(n: int = 512) -> DensityTarget:
    """p = N(0, I): U = |x|^2 / 2, log Z = log 2 pi (exact)."""
    return DensityTarget("gauss", lambda x: 0.5 * (x * x).sum(1), math.log(2 * math.pi), 4.0,
                         torch.randn(n, 2, generator=torch.Generator().manual_seed(1)))


def test_density_matching_kl_is_zero_for_the_exact_flow():
    task = DensityMatching(_gaussian_target(), batches=2)
    metrics, batches = task.evaluate(_identity(), 100)
    assert batches == 6  # 512 points in chunks of 100
    assert metrics["test_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(-math.log(2 * math.pi), abs=1e-6)


def test_density_matching_kl_of_a_scaled_gaussian_matches_the_closed_form():
    """q = N(0, s^2 I) by a linear CNF dz/dt = a z over [0, 1] (s = e^a); p = N(0, I):
    KL(q || p) = d/2 (s^2 - 1 - 2 log s) with d = 2, up to Monte Carlo error of the squares."""
    a = 0.3
    cnf = CNF(LinearField(a * torch.eye(2, dtype=torch.float64)),
              Solver("dopri5", rtol=1e-9, atol=1e-9), Gradient("direct"))
    target = _gaussian_target(20000)
    target.test_z = target.test_z.double()
    metrics, _ = DensityMatching(target).evaluate(cnf, 5000)
    s2 = math.exp(2 * a)
    z2 = float((target.test_z ** 2).sum(1).mean())  # the sample's E|z|^2, exact for this draw
    expected = 0.5 * z2 * (s2 - 1) - 2 * a  # log q - log p per point, averaged over the draw
    assert metrics["test_kl"] == pytest.approx(expected, rel=1e-6)
    assert abs(metrics["test_kl"] - (s2 - 1 - 2 * a)) < 0.05  # the closed form, within MC error


def test_task_loss_equals_the_library_loss():
    field_cnf = planar_cnf(Solver("dopri5", rtol=1e-6, atol=1e-6), Gradient("direct"), units=4)
    target = density_target("u2", test_samples=8)
    task = DensityMatching(target)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    ours, _ = task.loss(field_cnf, z)
    gen = torch.Generator().manual_seed(0)
    theirs, _ = density_matching_loss(field_cnf, target.U, 16, gen)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6)


def test_maximum_likelihood_nll_of_the_identity_flow_is_the_gaussian_nll():
    data = point_samples("moons", n_train=64, n_test=50, seed=3)
    metrics, batches = MaximumLikelihood(data).evaluate(_identity(), 20)
    assert batches == 3
    assert metrics["test_nll"] == pytest.approx(float(-log_normal(data.test_x).mean()), rel=1e-6)


def test_point_samples_are_seeded_and_shuffled():
    a, b = point_samples("circles", 100, 20, seed=1), point_samples("circles", 100, 20, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.test_x, b.test_x)
    radius = a.x.norm(dim=1)
    inner = radius < 2.25  # radii 1.5 and 3: both circles in the first half after shuffling
    assert 0 < int(inner[:50].sum()) < 50


def test_cnf_leaves_its_penalties_for_the_training_loop():
    cnf = planar_cnf(Solver("dopri5", rtol=1e-5, atol=1e-5), Gradient("direct"), units=2,
                     penalties={"kinetic": 0.5})
    cnf.train()
    cnf.to_target(torch.randn(8, 2))
    term, values = cnf.pending_penalties
    assert term.requires_grad and set(values) == {"kinetic"} and values["kinetic"] > 0
    density_matching_loss(cnf, density_target("u1", test_samples=4).U, 8)
    assert cnf.pending_penalties is None  # consumed by the library loss: not added twice
    with pytest.raises(Exception, match="penalty weight kinetic"):
        planar_cnf(Solver("dopri5"), Gradient("direct"), penalties={"kinetic": -1.0})
    assert isinstance(Penalties(kinetic=1.0).names, tuple)


def test_train_cnf_writes_validity_and_the_density_artifact(runs_dir):
    run = runs_dir / "cnf"
    assert main(["train", "experiment=chen2018_cnf_mle", "profile=tiny", "dataset=two_moons",
                 f"hydra.run.dir={run}"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "ok" and s["task"] == "maximum_likelihood" and s["model"] == "cnf"
    assert s["valid"] is True and 0 < s["validity_roundtrip_error"] < 1e-2
    assert s["nfe_forward"] > 0 and s["test_nll"] == s["best_test_nll"] or s["test_nll"] > 0
    rows = pd.read_csv(run / "metrics.csv")
    assert rows["validity_reference_error"].notna().all()
    art = torch.load(run / "density.pt")
    assert art["log_density"].shape == (100, 100) and art["samples"].shape == (2000, 2)
    # the planar NF (not an ODE model): no solve checks
    run = runs_dir / "nf"
    assert main(["train", "experiment=chen2018_cnf_mle", "profile=tiny", "flow=planar_nf",
                 f"hydra.run.dir={run}"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["model"] == "planar_nf" and s["valid"] is None and s["solver"] is None
    assert s["config"]["optim"]["name"] == "rmsprop"


def test_reproduce_cnf_density_writes_the_figure_4_report(runs_dir):
    assert main(["reproduce", "chen2018_cnf_density", "profile=tiny"]) == 0
    results = runs_dir / "cnf" / "density-tiny-results"
    table = pd.read_csv(results / "density.csv")
    assert list(table["target"]) == ["u1"] and list(table["K = M"]) == [2]
    assert table["lower"].iloc[0] in ("CNF", "NF")
    readme = (results / "README.md").read_text()
    assert "Figure 4" in readme and "(target, size) pairs" in readme
    assert (results / "density_matching.png").stat().st_size > 1000


@pytest.mark.parametrize("override, message", [
    ("dataset.target=u9", "unknown target 'u9'"),
    ("model.units=0", "model.units must be a positive integer"),
    ("dataset.task.batches=0", "batches must be a positive integer"),
])
def test_bad_flow_options_are_one_error_line(runs_dir, capsys, override, message):
    assert main(["train", "experiment=chen2018_cnf_density", "profile=tiny", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nodebench: error:") and message in err and "Traceback" not in err
    assert not any(runs_dir.rglob("summary.json"))
