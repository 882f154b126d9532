"""`make reproduce-mnist` at the tiny budget (synthetic data): every table and figure is produced."""

import json

from nodebench.experiments.mnist import main


def test_tiny_reproduction_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert main(["--profile", "tiny", "--runs", str(runs), "--results", str(results)]) == 0
    for name in ("README.md", "table1.md", "table1.csv", "table1.tex", "runs.csv", "memory_data.csv",
                 "memory.md", "memory.csv", "memory.png", "sweep_data.csv", "sweep.csv", "sweep.md", "fig3ab.png", "fig3cd.png",
                 "nfe_training.md"):
        assert (results / name).exists(), name
    summaries = [json.loads(p.read_text()) for p in runs.rglob("summary.json")]
    assert sorted(s["model"] for s in summaries) == ["control", "mlp", "odenet", "resnet", "rknet"]
    assert all(s["status"] == "ok" for s in summaries)
    control = next(s for s in summaries if s["model"] == "control")
    assert control["params"] == 3 * 3 * 64 + 64 + 2 * (64 * 64 * 16 + 64) + 2 * 2 * 64 + 2 * 64 + 650
    for s in summaries:  # the load is recorded at the start and the end of every run
        assert len(s["load_start"]) == 3 and len(s["load_end"]) == 3
        assert s["contended"] == (max(s["load_start"][0], s["load_end"][0]) > s["cores"] + 0.5)
        assert s["threads"] == 1
    text = (results / "README.md").read_text()
    assert "| ODE-Net" in text and "paper test error" in text and "Budget:" in text
    assert "Control: stem + head" in text and "target %" in text
    schedule = json.loads((results / "reproduce.json").read_text())
    assert schedule["lanes"] == [["odenet"], ["rknet", "resnet", "control", "mlp", "memory"]]
    assert "Reproduction wall time" in (results / "table1.md").read_text()
    for name in ("odenet_s0.log", "memory.log"):   # every job of a lane logs to its own file
        assert (runs / name).exists(), name
    # the checks stage (issue 13): validity and gradient error of the ODE models, in Table 1,
    # and the ODE-Net's validity at every tolerance of the sweep, in the sweep section
    checks = json.loads((runs / "odenet_s0" / "checks.json").read_text())
    assert [r["tol"] for r in checks["tolerances"]] == [1e-1, 1e-2, 1e-3]
    assert 0 <= checks["grad_rel_error_init"] and 0 <= checks["validity_roundtrip_error"]
    assert (runs / "rknet_s0" / "checks.json").exists()
    table = (results / "table1.csv").read_text()
    assert "round trip" in table and "grad. error init / end" in table
    assert "Solve validity of the trained ODE-Net" in text
    # The report step alone, run again on the same run folders, gives byte-identical tables.
    tables = (".md", ".csv", ".tex")
    before = {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in tables}
    assert main(["--profile", "tiny", "--runs", str(runs), "--results", str(results),
                 "--stages", "report"]) == 0
    after = {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in tables}
    assert before == after


def test_every_profile_composes_and_validates_for_every_model():
    from nodebench import config as C
    from nodebench.experiments.mnist import MODELS, PROFILES

    for name, profile in PROFILES.items():
        for model in MODELS:
            cfg = C.compose([f"model={model}", *profile["common"], *profile["models"][model],
                             "trainer.device=cpu"])   # the gpu profile's cuda is checked on a GPU
            C.validate(cfg, check_files=False)   # the test machine need not have MNIST
            assert cfg.trainer.batch_size == (32 if name == "tiny" else 128), (name, model)
        jobs = [job for lane in profile["lanes"] for job in lane]
        assert sorted(jobs) == sorted([*MODELS, "memory"]), name   # every model, once
    cpu = C.compose(["model=odenet", *PROFILES["cpu"]["common"], *PROFILES["cpu"]["models"]["odenet"]])
    assert (cpu.solver.method, cpu.solver.rtol, cpu.solver.atol) == ("dopri5", 1e-3, 1e-3)
    gpu = C.compose(["model=odenet", *PROFILES["gpu"]["common"]])
    assert gpu.trainer.epochs == 12 and list(gpu.optim.scheduler.milestones) == [5, 8, 11]


def test_gpu_profile_runs_at_a_tiny_size_on_cpu(tmp_path, monkeypatch):
    # PROFILE=gpu is meant for one datacenter GPU; here it runs its whole train + report path on
    # CPU at a tiny size (synthetic data, two batches), overriding only the size and the device.
    monkeypatch.chdir(tmp_path)
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert main(["--profile", "gpu", "--runs", str(runs), "--results", str(results),
                 "--stages", "train,report", "--set", "dataset=synthetic", "dataset.test_size=64", "trainer.device=cpu",
                 "trainer.epochs=2", "trainer.max_batches=2", "trainer.batch_size=32",
                 "optim.scheduler.milestones=[1]"]) == 0
    summaries = [json.loads(p.read_text()) for p in runs.rglob("summary.json")]
    assert sorted(s["model"] for s in summaries) == ["control", "mlp", "odenet", "resnet", "rknet"]
    assert all(s["status"] == "ok" and s["epochs_done"] == 2 and s["iterations"] == 4
               for s in summaries)
    assert (results / "table1.md").exists()
