"""Instruments: activation memory scaling (O(L), O(NFE), O(1)) and NFE split by phase."""

import torch

from nodebench import config as C
from nodebench.instruments import activation_mib

B = 8


def measure(*overrides):
    cfg = C.compose(list(overrides))
    torch.manual_seed(0)
    model = C.build_model(cfg, 1, 28, 10)
    x, y = torch.rand(B, 1, 28, 28), torch.randint(0, 10, (B,))
    return activation_mib(model, x, y)


def test_resnet_memory_grows_by_one_block_exactly():
    # Per pre-activation block, autograd keeps 4 distinct (B, 64, 6, 6) float tensors (block input,
    # ReLU output, conv1 output, second ReLU output) and two GroupNorms' mean and rstd (B x 32).
    per_block = (4 * B * 64 * 6 * 6 * 4 + 4 * B * 32 * 4) / 2 ** 20
    mems = [measure("model=resnet", f"model.blocks={n}")["activation_mib"] for n in (0, 1, 2, 4)]
    diffs = [mems[1] - mems[0], (mems[2] - mems[0]) / 2, (mems[3] - mems[0]) / 4]
    for d in diffs:
        assert abs(d - per_block) < 1e-9


def test_odenet_memory_is_flat_in_nfe_and_rknet_grows():
    ode = [measure("model=odenet", f"solver.rtol={t}", f"solver.atol={t}") for t in (1e-1, 1e-5)]
    rk = [measure("model=rknet", f"solver.rtol={t}", f"solver.atol={t}") for t in (1e-1, 1e-5)]
    assert ode[1]["nfe_forward"] > ode[0]["nfe_forward"]
    assert ode[0]["activation_mib"] == ode[1]["activation_mib"]      # O(1)
    assert rk[1]["nfe_forward"] == ode[1]["nfe_forward"]
    per_nfe = ((rk[1]["activation_mib"] - rk[0]["activation_mib"])
               / (rk[1]["nfe_forward"] - rk[0]["nfe_forward"]))
    assert per_nfe > 0.05                                               # O(NFE)
    assert rk[1]["activation_mib"] > 3 * ode[1]["activation_mib"]


def test_rk4_memory_linear_in_steps():
    m = [measure("model=rknet", "solver=rk4", f"solver.step_size={1 / n}") for n in (1, 2, 4)]
    assert [r["nfe_forward"] for r in m] == [4, 8, 16]
    d1 = m[1]["activation_mib"] - m[0]["activation_mib"]
    d2 = (m[2]["activation_mib"] - m[1]["activation_mib"]) / 2
    assert abs(d1 - d2) < 1e-6 and d1 > 0


def test_nfe_backward_zero_for_direct_and_positive_for_adjoint():
    assert measure("model=rknet")["nfe_backward"] == 0
    assert measure("model=odenet")["nfe_backward"] > 0
    r = measure("model=resnet")
    assert r["nfe_forward"] == 0 and r["nfe_backward"] == 0


# The meter counts what autograd keeps for backward when the forward pass ends: repeatable, and
# equal (within 1 KiB) to an independent count that walks the autograd graph from the loss.
MEMORY_CASES = [("model=rknet",), ("model=rknet", "solver=rk4", "solver.step_size=0.25"),
                ("model=odenet",), ("model=resnet",), ("model=control",)]


def _meter_and_graph(overrides, batch=B):
    from nodebench.instruments import ActivationMeter, graph_saved_bytes

    cfg = C.compose(list(overrides))
    torch.manual_seed(0)
    model = C.build_model(cfg, 1, 28, 10)
    torch.manual_seed(1)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    meter = ActivationMeter(model)
    readings = []
    for _ in range(4):
        with meter.measure(x.device):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        readings.append(meter.last_bytes)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # the graph of the last measured forward pass, and of one made without any hooks
    return readings, graph_saved_bytes(loss, params), graph_saved_bytes(
        torch.nn.functional.cross_entropy(model(x), y), params)


def test_memory_meter_repeatable_and_equal_to_graph_walk():
    import pytest

    for overrides in MEMORY_CASES:
        readings, walked, walked_plain = _meter_and_graph(overrides)
        assert len(set(readings)) == 1, (overrides, readings)            # identical repeats
        assert abs(readings[0] - walked) <= 1024, (overrides, readings[0], walked)
        assert walked == walked_plain                                    # hooks change nothing
        assert readings[0] > 0
    with pytest.raises(RuntimeError):    # a freed graph cannot be walked: no silent zero
        from nodebench.instruments import graph_saved_bytes

        m = C.build_model(C.compose(["model=resnet"]), 1, 28, 10)
        loss = m(torch.rand(2, 1, 28, 28)).sum()
        loss.backward()
        graph_saved_bytes(loss)


def test_memory_meter_ignores_branches_freed_before_the_forward_pass_ends():
    # dopri5's error estimate builds graph branches that are dropped during the solve; they must
    # not count. A branch computed and dropped inside the measured pass is not counted either.
    from nodebench.instruments import ActivationMeter

    lin = torch.nn.Linear(64, 64)
    meter = ActivationMeter(lin)
    x = torch.rand(32, 64)
    with meter.measure(x.device):
        kept = torch.relu(lin(x))
        dropped = torch.exp(lin(x) * 2)    # saves a (32, 64) float output, then freed
        del dropped
    assert meter.last_bytes == 32 * 64 * 4 * 2   # relu's output (saved) + the input x of lin
    del kept
