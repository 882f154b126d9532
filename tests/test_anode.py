"""Augmented Neural ODEs (Dupont et al. 2019): toy datasets and models, the conv image model's
exact parameter counts, the new dataset configs, and a tiny end-to-end reproduction."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nodebench import config as C
from nodebench.instruments import NFECounter
from nodebench.models.blocks import count_parameters
from nodebench.solvers import Gradient, Solver
from nodebench.toys import (
    TOY_MODELS,
    ToyField,
    annulus,
    annulus_wedge,
    g_1d,
    polar_angle,
    sample_shell,
)

DOPRI = Solver("dopri5", 1e-3, 1e-3, max_num_steps=1000)


# ------------------------------------------------------------------------------ toy datasets

def test_g_1d_maps_minus_one_to_one_and_back():
    d = g_1d(num_points=10)
    assert d.x.shape == (10, 1) and d.y.shape == (10, 1)
    assert torch.equal(d.y, -d.x)
    assert sorted(d.x.flatten().tolist()) == [-1.0] * 5 + [1.0] * 5
    assert d.test_x.flatten().tolist() == [-1.0, 1.0] and d.test_y.flatten().tolist() == [1.0, -1.0]


def test_annulus_labels_radii_and_counts():
    d = annulus(seed=3)
    assert d.x.shape == (3000, 2) and d.test_x.shape == (3000, 2)
    r = d.x.norm(dim=1)
    inner, outer = d.y.flatten() == -1, d.y.flatten() == 1
    assert inner.sum() == 1000 and outer.sum() == 2000
    assert r[inner].max() <= 0.5 + 1e-6
    assert r[outer].min() >= 1.0 - 1e-6 and r[outer].max() <= 1.5 + 1e-6
    # the two classes are separated by the gap (0.5, 1.0): no point falls inside it
    assert not ((r > 0.5 + 1e-6) & (r < 1.0 - 1e-6)).any()
    # the test set is a different sample of the same law
    assert not torch.equal(d.x, d.test_x)


def test_shell_sampler_radius_law():
    """Radius = (max - min) U^(1/d) + min: in d = 2, P(r <= min + (max - min) / 2) = 1/4."""
    g = torch.Generator().manual_seed(0)
    x = sample_shell(40000, 2, 1.0, 1.5, g)
    r = x.norm(dim=1)
    frac = (r <= 1.25).float().mean().item()
    assert abs(frac - 0.25) < 0.01
    # uniform direction: mean angle-cosine near zero
    assert abs(torch.cos(polar_angle(x)).mean().item()) < 0.02


def test_wedge_is_held_out():
    d = annulus_wedge(seed=0)
    wedge = (0.0, math.pi / 5)
    train_angle, test_angle = polar_angle(d.x), polar_angle(d.test_x)
    assert ((test_angle >= wedge[0]) & (test_angle <= wedge[1])).all()
    assert not ((train_angle >= wedge[0]) & (train_angle <= wedge[1])).any()
    assert d.x.shape[0] + d.test_x.shape[0] == 3000
    # about a tenth of the points fall in a wedge of pi/5 radians
    assert 200 < d.test_x.shape[0] < 400
    assert set(d.test_y.flatten().tolist()) == {-1.0, 1.0}


# -------------------------------------------------------------------------------- toy models

@pytest.mark.parametrize("name,p", [("node", 0), ("anode1", 1), ("anode2", 2), ("anode5", 5)])
def test_toy_ode_sizes(name, p):
    """f: (d+p+1) -> 32 -> 32 -> (d+p); readout Linear(d+p, 1); features live in R^(d+p)."""
    d = 2
    model = TOY_MODELS[name](d, solver=DOPRI, gradient=Gradient("adjoint"))
    D = d + p
    field = (D + 1) * 32 + 32 + 32 * 32 + 32 + 32 * D + D
    assert count_parameters(model) == field + D + 1
    x = torch.randn(7, d)
    assert model.features(x).shape == (7, D)
    assert model(x).shape == (7, 1)


def test_toy_field_time_is_an_input():
    f = ToyField(3)
    h = torch.randn(4, 3)
    assert not torch.allclose(f(torch.tensor(0.0), h), f(torch.tensor(1.0), h))


def test_anode_augmented_state_starts_at_zero_and_first_readout():
    model = TOY_MODELS["anode1"](1, solver=DOPRI, gradient=Gradient("direct"), readout="first")
    x = torch.tensor([[-1.0], [1.0]])
    traj = model.trajectory(x, torch.tensor([0.0, 0.5, 1.0]))
    assert traj.shape == (3, 2, 2)
    assert torch.equal(traj[0], torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert count_parameters(model) == (2 + 1) * 32 + 32 + 32 * 32 + 32 + 32 * 2 + 2  # no readout
    assert torch.equal(model(x), model.features(x)[:, :1])


def test_node_1d_flow_preserves_order():
    """The claim's mechanism: a 1-D ODE flow cannot swap -1 and 1, whatever the weights."""
    torch.manual_seed(0)
    for _ in range(5):
        model = TOY_MODELS["node"](1, solver=Solver("dopri5", 1e-5, 1e-5),
                                   gradient=Gradient("direct"), readout="first")
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.5)
        out = model(torch.tensor([[-1.0], [1.0]])).flatten()
        assert out[0] < out[1]


def test_resnet_has_no_dynamics_and_counts():
    model = TOY_MODELS["resnet"](2, solver=DOPRI, gradient=Gradient("adjoint"))
    assert not NFECounter(model).active
    assert count_parameters(model) == 5 * (2 * 32 + 32 + 32 * 2 + 2) + 3


def test_toy_nfe_counted_forward_and_backward():
    model = TOY_MODELS["node"](2, solver=DOPRI, gradient=Gradient("adjoint"))
    nfe = NFECounter(model)
    x = torch.randn(16, 2)
    with nfe.phase_("forward"):
        loss = model(x).square().mean()
    with nfe.phase_("backward"):
        loss.backward()
    nf, nb = nfe.take("forward"), nfe.take("backward")
    assert nf >= 8 and (nf - 2) % 6 == 0  # dopri5: 2 evaluations to start, 6 per step
    assert nb > 0


# ----------------------------------------------------------------------- conv image models

COUNTS = {  # (model, dataset, time_dependent) -> parameters, reference.md section 2
    ("node_conv", "mnist", False): 84_395, ("anode_conv", "mnist", False): 84_816,
    ("node_conv", "mnist", True): 85_316, ("anode_conv", "mnist", True): 85_462,
    ("node_conv", "cifar10", False): 172_358, ("anode_conv", "cifar10", False): 171_799,
    ("node_conv", "cifar10", True): 173_611, ("anode_conv", "cifar10", True): 172_452,
}
CIFAR_WIDTH = {"node_conv": "model.filters=125", "anode_conv": "model.augment_dim=10"}


@pytest.mark.parametrize("model,dataset,time_dependent", sorted(COUNTS))
def test_conv_parameter_counts_exact(model, dataset, time_dependent):
    overrides = [f"model={model}", "dataset=synthetic", f"model.time_dependent={time_dependent}"]
    shape = (1, 28)
    if dataset == "cifar10":
        overrides = [*overrides, CIFAR_WIDTH[model], "dataset=cifar10_fake"]
        shape = (3, 32)
    cfg = C.compose(overrides)
    net = C.build_model(cfg, shape[0], shape[1], 10)
    assert count_parameters(net) == COUNTS[(model, dataset, time_dependent)]


def test_conv_anode_pads_channels_and_shapes():
    cfg = C.compose(["model=anode_conv", "dataset=synthetic", "solver.max_num_steps=1000"])
    net = C.build_model(cfg, 1, 28, 10)
    x = torch.rand(2, 1, 28, 28)
    assert net.features(x).shape == (2, 6, 28, 28)
    assert net(x).shape == (2, 10)


# ------------------------------------------------------------- configs compose and run a few steps

def _train_few(tmp_path, overrides):
    cfg = C.compose([*overrides, "optim=adam", "trainer.epochs=1", "trainer.max_batches=1",
                     "trainer.batch_size=8", "trainer.eval_batch_size=64", "trainer.progress=false",
                     "trainer.save_model=false", "solver.max_num_steps=1000",
                     f"paths.runs={tmp_path}"])
    from nodebench.train import run

    return run(cfg, tmp_path / "run")


@pytest.mark.parametrize("model", ["node_conv", "anode_conv"])
def test_conv_models_train_on_synthetic(tmp_path, model):
    s = _train_few(tmp_path, [f"model={model}", "dataset=synthetic", "dataset.train_size=16",
                              "dataset.test_size=8", "model.filters=8"])
    assert s["status"] == "ok" and s["nfe_forward"] > 0 and s["nfe_backward"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model"] == model


@pytest.mark.parametrize("dataset", ["cifar10_fake", "svhn_fake"])
def test_fake_vision_datasets_train(tmp_path, dataset):
    s = _train_few(tmp_path, ["model=anode_conv", f"dataset={dataset}", "dataset.train_size=16",
                              "dataset.test_size=8", "model.filters=8", "model.augment_dim=10"])
    assert s["status"] == "ok" and s["dataset"] == dataset
    assert s["params"] == 8 * 13 + 8 + 8 * 8 * 9 + 8 + 8 * 13 + 13 + 13 * 32 * 32 * 10 + 10


def test_cifar100_fake_has_100_classes_and_trains(tmp_path):
    cfg = C.compose(["dataset=cifar100_fake", "dataset.train_size=12", "dataset.test_size=6"])
    data = C._call(cfg.dataset, "dataset")
    assert data.num_classes == 100 and tuple(data.train_x.shape) == (12, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and int(data.train_y.max()) < 100
    s = _train_few(tmp_path, ["model=anode_conv", "dataset=cifar100_fake", "dataset.train_size=16",
                              "dataset.test_size=8", "model.filters=8", "model.augment_dim=10"])
    assert s["status"] == "ok" and s["dataset"] == "cifar100_fake"
    # the linear head maps 13 x 32 x 32 features to 100 logits
    assert s["params"] == 8 * 13 + 8 + 8 * 8 * 9 + 8 + 8 * 13 + 13 + 13 * 32 * 32 * 100 + 100


def test_cifar100_sizes_are_checked():
    with pytest.raises(C.ConfigError, match="50000"):
        C.check_dataset(C.compose(["dataset=cifar100", "dataset.train_size=60000"]), False)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn"])
def test_real_vision_datasets_say_what_is_missing(tmp_path, dataset):
    cfg = C.compose([f"dataset={dataset}", f"paths.data={tmp_path}"])
    with pytest.raises(C.ConfigError, match="not found"):
        C._call(cfg.dataset, "dataset")
    assert not (tmp_path / dataset).exists()

