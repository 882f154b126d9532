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
from nodebench.experiments import shapes_report as report
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


def test_rotate_false_draws_axis_aligned_rectangles():
    """Without rotation the fully covered pixels of a rectangle fill their bounding box (a solid
    axis-aligned rectangle); with rotation they do not. The random stream is the same."""
    def solid_fraction(rotate):
        img = _render([("rectangle",)] * 8, 64, (0.3, 0.3), np.random.default_rng(3), rotate)
        out = []
        for im in img[:, 0]:
            ys, xs = np.nonzero(im == 255)
            out.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
        return np.array(out)
    assert (solid_fraction(False) == 1.0).all()
    assert (solid_fraction(True) < 0.95).sum() >= 4
    a = shapes(train_size=30, test_size=10, rotate=False)
    b = shapes(train_size=30, test_size=10)
    assert torch.equal(a.train_y, b.train_y)                    # same labels, other pixels
    assert not torch.equal(a.train_x, b.train_x)


def test_radius_sets_the_shape_size():
    small = shapes(train_size=60, test_size=10, noise=0, radius=[0.1, 0.1])
    large = shapes(train_size=60, test_size=10, noise=0, radius=[0.3, 0.3])
    ratio = large.train_x.float().sum() / small.train_x.float().sum()
    assert 7.0 < ratio < 11.0                                       # area ~ R^2: 9x


@pytest.mark.parametrize("kwargs", [{"radius": [0.3, 0.2]}, {"radius": [0.01, 0.2]},
                                    {"radius": [0.2, 0.5]}, {"radius": "big"},
                                    {"rotate": "yes"}])
def test_bad_radius_or_rotate_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        shapes(train_size=5, test_size=5, **kwargs)
    with pytest.raises(ConfigError, match="0.25"):
        shapes_compound(train_size=5, test_size=5, radius=[0.2, 0.3])


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


def test_preset_studies_compose_with_the_seeds_settings():
    """Each study of conf/study/ sets the seed's dataset, training images and step; the sweep's
    solver choice keeps the study's step."""
    expected = {"single": ("shapes", 2700, 0.05), "compound": ("shapes_compound", 2700, 0.05),
                "small500": ("shapes", 500, 0.01), "small1350": ("shapes", 1350, 0.025),
                "small500c": ("shapes_compound", 500, 0.01),
                "small1350c": ("shapes_compound", 1350, 0.025)}
    assert set(report.STUDIES) == set(expected)
    for study, (dataset, train, step) in expected.items():
        for solver in report.SOLVERS:
            cfg = compose(["experiment=seed004_shapes", f"study={study}", f"solver={solver}"])
            assert (cfg.study.name, cfg.dataset.name, cfg.dataset.train_size) == (study, dataset,
                                                                                  train)
            assert cfg.solver.method == solver and cfg.solver.step_size == step
            assert cfg.model.name == "shapes_odenet" and cfg.model.width == 64
            assert cfg.trainer.epochs == 5 and cfg.trainer.batch_size == 120


@pytest.mark.slow
def test_reproduce_tiny_end_to_end(runs_dir):
    """``nodebench reproduce seed004_shapes profile=tiny``: 3 solvers x 2 seeds through the
    trainer, exact step and fixed-point counts, and the report read from the run records."""
    from nodebench.cli import main

    assert main(["reproduce", "seed004_shapes", "profile=tiny"]) == 0
    runs = runs_dir / "seed004_shapes-tiny"
    results = runs_dir / "shapes-tiny-results"
    summaries = {(s["config"]["solver"]["method"], s["seed"]): (p.parent, s) for p in
                 runs.rglob("summary.json") for s in [json.loads(p.read_text())]}
    assert sorted(summaries) == sorted((m, seed) for m in report.SOLVERS for seed in (0, 1))
    for (solver, seed), (run_dir, summary) in summaries.items():
        assert run_dir.name.endswith(f"_single_{solver}_s{seed}")
        assert summary["status"] == "ok" and summary["config"]["solver"]["step_size"] == 0.05
        stats = summary["implicit_iterations"]
        rows = list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))
        nfe_forward = float(rows[0]["nfe_forward"])
        if solver == "euler":
            assert stats is None and nfe_forward == 20.0  # 1 / 0.05 steps
            assert rows[0]["implicit_iters_forward"] == ""
        else:  # 2 training batches + 2 eval batches of 20 steps each
            assert stats["forward_steps"] == 4 * 20 and stats["backward_steps"] == 2 * 20
            assert nfe_forward * 2 + float(rows[0]["nfe_eval"]) * 2 == stats["forward_iters"]
            # the trainer's per-epoch means: training forward solves only (no evaluation)
            assert float(rows[0]["implicit_iters_forward"]) == nfe_forward / 20
            assert float(rows[0]["implicit_iters_backward"]) == stats["backward_iters"] / 40
        assert summary["validity_reference_error"] is not None
    table = (results / "single.md").read_text()
    assert "43.483%" in table and "Implicit Euler (ours)" in table and "tiny" in table
    assert "| runs | 2 ok |" in table and "% ± " in table and "seeds 0, 1" in table
    assert "| solves valid |" in table
    assert (results / "accuracy_by_epoch.png").stat().st_size > 0
    readme = (results / "README.md").read_text()
    assert "single, Explicit Euler:" in readme and "compound, Explicit Euler: not run." in readme
    rows = list(csv.DictReader((results / "shapes.csv").read_text().splitlines()))
    assert len(rows) == 6 and {r["solver"] for r in rows} == set(report.SOLVERS)


def test_verdicts_against_the_targets():
    def run(acc, status="ok"):
        return {"summary": {"status": status},
                "rows": [{"test_error": 50.0}, {"test_error": 100.0 - acc}], "stats": {}}
    loaded = {"single": {"euler": [run(98.0), run(97.0)], "implicit_euler": [run(96.0)],
                         "crank_nicolson": [run(99.0), run(100.0, "failed")]},
              "compound": {"euler": [run(90.0), run(79.0)]}}
    out = report.verdicts(loaded)
    assert out[0].startswith("single, Explicit Euler: 97.50 %") and out[0].endswith(" met.")
    assert out[1].endswith("NOT met.")
    # a failed run (even one that had reached 100 % before failing) fails the target
    assert "99.00 %" in out[2] and "1 of 2 runs failed" in out[2] and out[2].endswith("NOT met.")
    assert "84.50 %" in out[3] and "lowest 79.00 %" in out[3] and out[3].endswith("NOT met.")
    loaded["compound"]["euler"] = [run(99.0, "failed")]
    assert report.verdicts(loaded)[3] == "compound, Explicit Euler: all 1 runs failed: NOT met."
