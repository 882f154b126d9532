"""Every config in conf/ composes (lightning-hydra-template's rule) and validates."""

from pathlib import Path

import pytest

from nodebench import config as C
from nodebench.solvers import is_fixed_step

CONF = Path(C.CONF_DIR)
# Configs that need extra settings to be valid, and those settings.
NEEDS = {("solver", m): ["solver.step_size=0.5"]
         for m in (p.stem for p in (CONF / "solver").glob("*.yaml")) if is_fixed_step(m)}


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


CASES = [(g, o) for g in ("model", "solver", "adjoint", "optim", "trainer", "dataset")
         for o in options(g)]


# Models and datasets of the other tasks (nodebench.tasks), and a partner from the same task.
PARTNER = {**{("model", m): "dataset=annulus" for m in ("node_toy", "anode_toy", "anode2_toy",
                                                        "anode5_toy", "resnet_toy")},
           **{("model", m): "dataset=spirals" for m in ("latent_ode", "rnn", "rnn_dt")},
           **{("model", m): "dataset=ode_spiral" for m in ("ode_small", "ode_deep")},
           **{("dataset", d): "model=anode_toy" for d in ("g_1d", "annulus", "annulus_wedge",
                                                          "rings_wedge")},
           ("dataset", "spirals"): "model=latent_ode",
           **{("model", m): "dataset=density" for m in ("cnf", "planar_nf")},
           **{("dataset", d): "model=cnf" for d in ("density", "two_circles", "two_moons")},
           **{("dataset", d): "model=ode_small" for d in options("dataset") if d.startswith("ode_")}}


@pytest.mark.parametrize("group,option", CASES)
def test_config_composes_and_validates(group, option):
    partner = PARTNER.get((group, option), "dataset=synthetic")
    overrides = [partner, f"{group}={option}", *NEEDS.get((group, option), [])]
    if group == "adjoint" and option == "seminorm":
        overrides.append("model=odenet")
    cfg = C.compose(overrides)
    if cfg.dataset.get("check"):      # file-backed datasets: composition only (no data in CI)
        return
    C.validate(cfg)


def test_fixed_step_solvers_need_a_step_size():
    from nodebench.errors import ConfigError

    for method in ("euler", "rk4"):
        with pytest.raises(ConfigError, match="set solver.step_size"):
            C.validate(C.compose(["dataset=synthetic", f"solver={method}"]))


def test_sweep_expansion():
    jobs = C.expand_sweep(["model=resnet,odenet", "seed=0,1", "trainer.epochs=2"])
    assert len(jobs) == 4
    assert ["model=resnet", "seed=0", "trainer.epochs=2"] in jobs
