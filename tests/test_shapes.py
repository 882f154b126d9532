"""Seed 004's shapes datasets, classifier and study driver (tiny profile end to end)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from nodebench import implicit  # noqa: F401 - registers the implicit solvers
from nodebench.config import _call, build_model, compose
from nodebench.errors import ConfigError
from nodebench.experiments import shapes as study
from nodebench.models.blocks import count_parameters
from nodebench.shapes import COMPOUND_CLASSES, SHAPE_CODE, _render, shapes, shapes_compound


def test_deterministic_prefix_and_fixed_test_set():
    a = shapes(train_size=40, test_size=20, image_size=20, seed=3)
    b = shapes(train_size=40, test_size=20, image_size=20, seed=3)
    small = shapes(train_size=15, test_size=20, image_size=20, seed=3)
    other = shapes(train_size=40, test_size=20, image_size=20, seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert torch.equal(small.train_x, a.train_x[:15]) and torch.equal(small.train_y, a.train_y[:15])
    assert torch.equal(small.test_x, a.test_x)  # "tested over the same samples"
    assert not torch.equal(other.train_x, a.train_x)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape == (40, 1, 20, 20)
    assert a.train_y.dtype == torch.int64 and set(a.train_y.tolist()) <= {0, 1, 2}
    assert a.num_classes == 3 and not a.augment


def test_compound_labels_follow_the_seed():
    """blank 0, circle 1, triangle 2, rectangle 3; a pair (a, b) is a + b + 1."""
    assert COMPOUND_CLASSES[SHAPE_CODE["circle"] + SHAPE_CODE["triangle"] + 1] == "circle+triangle"
    assert COMPOUND_CLASSES[SHAPE_CODE["circle"] + SHAPE_CODE["rectangle"] + 1] == \
        "circle+rectangle"
    assert COMPOUND_CLASSES[SHAPE_CODE["triangle"] + SHAPE_CODE["rectangle"] + 1] == \
        "triangle+rectangle"
    d = shapes_compound(train_size=300, test_size=10, image_size=28, seed=0, noise=8)
    assert d.num_classes == 7 and set(d.train_y.tolist()) == set(range(7))
    ink = (d.train_x > 128).flatten(1).sum(1)
    blank = d.train_y == 0
    assert d.train_x[blank].max() <= 8  # only the background noise
    assert (ink[~blank] > 4).all()
    pairs = d.train_y >= 4
    assert ink[pairs].float().mean() > ink[(d.train_y >= 1) & (d.train_y <= 3)].float().mean() * 0.9


def test_rasteriser_areas():
    """A circle of radius R covers pi R^2 pixels (anti-aliased sum / 255) to 1%; a triangle
    inscribed in the same circle at most the equilateral 3 sqrt(3)/4 R^2."""
    rng = np.random.default_rng(0)
    size = 64
    img = _render([("circle",)] * 5, size, (0.3, 0.3), rng)
    R = 0.3 * size
    areas = img.reshape(5, -1).sum(1) / 255.0
    assert areas == pytest.approx([math.pi * R * R] * 5, rel=0.01)
    tri = _render([("triangle",)] * 5, size, (0.3, 0.3), rng).reshape(5, -1).sum(1) / 255.0
    assert (tri <= 3 * math.sqrt(3) / 4 * R * R * 1.02).all() and (tri > 0.25 * R * R).all()


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError):
        shapes(train_size=0)
    with pytest.raises(ConfigError):
        shapes(image_size=8)
    with pytest.raises(ConfigError):
        shapes_compound(train_size=5, test_size=5, noise=300)


@pytest.mark.parametrize("name,classes", [("shapes", 3), ("shapes_compound", 7)])
def test_dataset_configs_and_model(name, classes):
    cfg = compose([f"dataset={name}", "model=shapes_odenet", "solver=crank_nicolson",
                   "solver.step_size=0.25", "dataset.train_size=8", "dataset.test_size=4"])
    data = _call(cfg.dataset, "dataset")
    assert data.num_classes == classes == cfg.dataset.shape.classes
    assert data.train_x.shape == (8, 1, 28, 28)
    model = build_model(cfg, 1, 28, classes)
    assert count_parameters(model) == 132_096 + 75_136 + 128 + 65 * classes  # stem, f, head
    assert model(data.train_x.float() / 255).shape == (8, classes)


def test_small_width_head_sees_its_input():
    """Regression: with 1 channel per GroupNorm group (width 16) the GN -> average-pool head
    returned the GN bias for every image. With 2 channels per group the logits vary."""
    cfg = compose(["dataset=shapes", "model=shapes_odenet", "model.width=16", "solver=euler",
                   "solver.step_size=0.25"])
    torch.manual_seed(0)
    model = build_model(cfg, 1, 28, 3)
    for m in model.modules():  # non-trivial affine parameters, as after training
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight)
    with torch.no_grad():
        logits = model(torch.rand(4, 1, 28, 28))
    assert (logits - logits[0]).abs().max() > 1e-3


def test_driver_tiny_end_to_end(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    code = study.main(["--profile", "tiny", "--studies", "single", "--jobs", "1",
                       "--runs", str(runs), "--results", str(results)])
    assert code == 0
    for solver in study.SOLVERS:
        run_dir = runs / f"single_{solver}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "ok" and summary["solver"] == solver
        assert summary["config"]["solver"]["step_size"] == 0.05
        stats = json.loads((run_dir / "implicit_stats.json").read_text())
        rows = list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))
        nfe_forward = float(rows[0]["nfe_forward"])
        if solver == "euler":
            assert stats["forward_iters"] == 0 and nfe_forward == 20.0  # 1 / 0.05 steps
            assert rows[0]["implicit_iters_forward"] == "" and summary["implicit_iterations"] is None
        else:  # 2 training batches + 2 eval batches of 20 steps each
            assert stats["forward_steps"] == 4 * 20 and stats["backward_steps"] == 2 * 20
            assert nfe_forward * 2 + float(rows[0]["nfe_eval"]) * 2 == stats["forward_iters"]
            # the trainer's per-epoch means: training forward solves only (no evaluation)
            assert float(rows[0]["implicit_iters_forward"]) == nfe_forward / 20
            assert float(rows[0]["implicit_iters_backward"]) == stats["backward_iters"] / 40
            assert summary["implicit_iterations"] == {k: stats[k] for k in summary[
                "implicit_iterations"]}
    for solver in study.SOLVERS:  # the tiny profile's second seed: its own folder and seed
        s1 = json.loads((runs / f"single_{solver}_s1" / "summary.json").read_text())
        assert s1["status"] == "ok" and s1["config"]["seed"] == 1
    table = (results / "single.md").read_text()
    assert "43.483%" in table and "Implicit Euler (ours)" in table and "tiny" in table
    assert "| runs | 2 ok |" in table and "% ± " in table and "seeds 0, 1" in table
    assert (results / "accuracy_by_epoch.png").stat().st_size > 0
    assert (results / "README.md").exists() and (results / "shapes.csv").exists()
