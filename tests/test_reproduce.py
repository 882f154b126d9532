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
    # The report step alone, run again on the same run folders, gives byte-identical tables.
    tables = (".md", ".csv", ".tex")
    before = {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in tables}
    assert main(["--profile", "tiny", "--runs", str(runs), "--results", str(results),
                 "--stages", "report"]) == 0
    after = {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in tables}
    assert before == after
