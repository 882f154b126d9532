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


@pytest.mark.parametrize("group,option", CASES)
def test_config_composes_and_validates(group, option):
    overrides = ["dataset=synthetic", f"{group}={option}", *NEEDS.get((group, option), [])]
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
