"""Exact parameter counts of the Table-1 models (reference.md, section 1) and basic shapes."""

import pytest
import torch

from nodebench import config as C
from nodebench.models.blocks import ODEBlock, count_parameters

EXPECTED = {
    ("mlp", "conv"): 238_510,
    ("resnet", "conv"): 576_778,
    ("resnet", "res"): 601_482,
    ("odenet", "conv"): 208_266,
    ("odenet", "res"): 232_970,
    ("rknet", "conv"): 208_266,
    ("rknet", "res"): 232_970,
}


def build(*overrides):
    cfg = C.compose(list(overrides))
    return cfg, C.build_model(cfg, 1, 28, 10)


@pytest.mark.parametrize("model,stem", sorted(EXPECTED))
def test_parameter_counts_exact(model, stem):
    overrides = [f"model={model}"] + ([f"model.stem={stem}"] if model != "mlp" else [])
    _, net = build(*overrides)
    assert count_parameters(net) == EXPECTED[(model, stem)]


def test_stem_and_head_only_count():
    _, net = build("model=resnet", "model.blocks=0")
    assert count_parameters(net) == 132_874
    _, net = build("model=resnet", "model.blocks=0", "model.stem=res")
    assert count_parameters(net) == 157_578


def test_rknet_is_odenet_with_direct_gradients():
    cfg_r, rk = build("model=rknet")
    cfg_o, ode = build("model=odenet")
    assert cfg_r.model.gradient == "direct" and cfg_o.model.gradient == "adjoint"
    blocks = [m for m in rk.modules() if isinstance(m, ODEBlock)]
    assert len(blocks) == 1 and blocks[0].gradient.mode == "direct"
    assert [p.shape for p in rk.parameters()] == [p.shape for p in ode.parameters()]


def test_anode_appends_zero_channels():
    _, net = build("model=anode", "model.augment_dim=5")
    block = next(m for m in net.modules() if isinstance(m, ODEBlock))
    assert block.augment_dim == 5
    out = net(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("model", ["mlp", "resnet", "rknet", "odenet"])
def test_forward_shapes(model):
    _, net = build(f"model={model}", "solver=euler", "solver.step_size=0.5")
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
