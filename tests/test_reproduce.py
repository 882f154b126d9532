"""`make reproduce-mnist` (nodebench reproduce chen2018_table1) at the tiny budget on synthetic
data: every table and figure is produced, the stages after the sweep ran, the per-model budgets
of every profile compose."""

import json

import pytest

from nodebench.config import compose, validate

MODELS = ("mlp", "resnet", "rknet", "odenet", "control")


@pytest.mark.slow
def test_tiny_reproduction_end_to_end(runs_dir):
    from nodebench.cli import main
    from nodebench.experiments.table1 import report

    assert main(["reproduce", "chen2018_table1", "profile=tiny"]) == 0
    runs = runs_dir / "chen2018_table1-tiny"
    results = runs_dir / "mnist-tiny-results"   # reproduce.folder mnist, tiny: under runs/
    for name in ("README.md", "table1.md", "table1.csv", "table1.tex", "runs.csv",
                 "memory_data.csv", "memory.md", "memory.csv", "memory.png", "sweep_data.csv",
                 "sweep.csv", "sweep.md", "fig3ab.png", "fig3cd.png", "nfe_training.md",
                 "reproduce.json"):
        assert (results / name).exists(), name
    summaries = {json.loads(p.read_text())["model"]: json.loads(p.read_text())
                 for p in runs.rglob("summary.json")}
    assert sorted(summaries) == sorted(MODELS)
    for model, s in summaries.items():
        assert (runs / f"{model}_s0" / "summary.json").exists()    # hydra subdir <model>_s<seed>
        assert s["status"] == "ok" and s["epochs_done"] == 1 and s["iterations"] == 2
        assert s["threads"] == 1 and s["dataset"] == "synthetic"
        assert len(s["load_start"]) == 3 and len(s["load_end"]) == 3
        assert s["config"]["optim"]["name"] == "sgd_onecycle"     # the profile's overrides
    control = summaries["control"]
    assert control["params"] == 3 * 3 * 64 + 64 + 2 * (64 * 64 * 16 + 64) + 2 * 2 * 64 + 2 * 64 + 650
    text = (results / "README.md").read_text()
    assert "| ODE-Net" in text and "paper test error" in text and "Budget:" in text
    assert "Control: stem + head" in text and "target %" in text
    schedule = json.loads((results / "reproduce.json").read_text())
    assert schedule["jobs"] == 2 and schedule["threads_per_job"] == 1
    assert schedule["sweep_wall_s"] <= schedule["wall_s"]
    assert "2 training job(s) at a time" in (results / "table1.md").read_text()
    # the checks stage (issue 13): validity and gradient error of the ODE models in Table 1, and
    # the ODE-Net's validity at every tolerance of the sweep in the sweep section
    checks = json.loads((runs / "odenet_s0" / "checks.json").read_text())
    assert [r["tol"] for r in checks["tolerances"]] == [1e-1, 1e-2, 1e-3]
    assert 0 <= checks["grad_rel_error_init"] and 0 <= checks["validity_roundtrip_error"]
    assert (runs / "rknet_s0" / "checks.json").exists()
    assert not (runs / "resnet_s0" / "checks.json").exists()
    table = (results / "table1.csv").read_text()
    assert "round trip" in table and "grad. error init / end" in table
    assert "Solve validity of the trained ODE-Net" in text
    sweep = (results / "sweep_data.csv").read_text().splitlines()
    assert len(sweep) == 1 + 3                        # the tiny profile's three tolerances
    # The report alone, run again on the same run folders, gives byte-identical tables.
    tables = (".md", ".csv", ".tex")
    before = {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in tables}
    report(runs, results, "tiny")
    after = {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in tables}
    assert before == after
    # The same command again resumes: every run is finished, nothing retrains, the timing of
    # the first reproduction is kept.
    assert main(["reproduce", "chen2018_table1", "profile=tiny"]) == 0
    assert json.loads((results / "reproduce.json").read_text()) == schedule


def test_sweep_overrides_are_told_from_single_values():
    from nodebench.reproduce import _is_sweep

    assert _is_sweep("model=odenet,rknet") and _is_sweep("seed=range(0,3)")
    assert not _is_sweep("optim.scheduler.milestones=[5,8,11]")
    assert not _is_sweep("reproduce.memory.tols=[0.1,0.01]") and not _is_sweep("seed=0")
    assert not _is_sweep("dataset.root='a,b'") and not _is_sweep("+x={a: 1, b: 2}")


@pytest.mark.parametrize("profile", ["cpu", "gpu", "paper", "tiny"])
def test_every_profile_composes_and_validates_for_every_model(profile):
    epochs = {"cpu": {"mlp": 10}, "gpu": {}, "paper": {}, "tiny": {}}[profile]
    default = {"cpu": 2, "gpu": 12, "paper": 160, "tiny": 1}[profile]
    for model in MODELS:
        cfg = compose(["experiment=chen2018_table1", f"profile={profile}", f"model={model}",
                       "trainer.device=cpu"])   # the gpu profile's cuda is checked on a GPU
        validate(cfg, check_files=False)        # the test machine need not have MNIST
        assert cfg.trainer.epochs == epochs.get(model, default), (profile, model)
        assert cfg.trainer.batch_size == (32 if profile == "tiny" else 128)
        assert cfg.trainer.channels_last == (profile == "cpu" and model in ("resnet", "control"))
        if profile == "cpu":
            assert cfg.trainer.max_batches == (None if model == "mlp" else 352)
            assert cfg.dataset.augment is False and cfg.trainer.threads == 1
    ode = compose(["experiment=chen2018_table1", "profile=cpu"])
    assert (ode.model.name, ode.solver.method, ode.solver.rtol, ode.solver.atol) == \
        ("odenet", "dopri5", 1e-3, 1e-3)
    assert list(ode.reproduce.targets) == ["mlp", "resnet", "rknet", "odenet"]
    gpu = compose(["experiment=chen2018_table1", "profile=gpu"])
    assert list(gpu.optim.scheduler.milestones) == [5, 8, 11]
    paper = compose(["experiment=chen2018_table1", "profile=paper"])
    assert list(paper.optim.scheduler.milestones) == [60, 100, 140]
    assert paper.dataset.augment is True
    # a model the preset does not list trains the paper's 160 epochs
    other = compose(["experiment=chen2018_table1", "profile=paper", "model=anode"])
    assert other.trainer.epochs == 160 and other.trainer.max_batches is None


def test_gpu_profile_runs_at_a_tiny_size_on_cpu(runs_dir):
    # profile=gpu is meant for one datacenter GPU; here its whole path (sweep, stages, report)
    # runs on CPU at a tiny size, overriding only the sizes and the device.
    from nodebench.cli import main

    assert main(["reproduce", "chen2018_table1", "profile=gpu", "model=odenet,mlp",
                 "dataset=synthetic", "trainer.device=cpu", "trainer.batch_size=32",
                 "trainer.max_batches=2", "table1.odenet.epochs=2", "table1.mlp.epochs=2",
                 "optim.scheduler.milestones=[1]", "reproduce.memory.batch=4",
                 "reproduce.memory.tols=[0.1]", "reproduce.memory.rk4_steps=[1]",
                 "reproduce.memory.blocks=[0]", "reproduce.tolerance_sweep.batch=8",
                 "reproduce.tolerance_sweep.tols=[0.1]", "reproduce.checks.batch=2",
                 "reproduce.checks.gradient_batch=2"]) == 0
    runs = runs_dir / "chen2018_table1-gpu"
    summaries = [json.loads(p.read_text()) for p in runs.rglob("summary.json")]
    assert sorted(s["model"] for s in summaries) == ["mlp", "odenet"]
    assert all(s["status"] == "ok" and s["epochs_done"] == 2 and s["iterations"] == 4
               for s in summaries)
