"""The report step on a fixture tree of run directories: exact tables, failed runs shown."""

import json

import pytest

from nodebench.report import aggregate, collect, table1, to_markdown


def write_run(root, name, **fields):
    base = {"status": "ok", "error": None, "model": "resnet", "solver": None,
            "solver_desc": None, "gradient": None, "dataset": "mnist", "seed": 0,
            "params": 576778, "train_size": 1000, "test_size": 500, "device": "cpu (test)",
            "wall_time_s": 60.0, "epochs_done": 2, "best_epoch": 2, "test_error": 1.0,
            "best_test_error": 1.0, "nfe_forward": 0.0, "nfe_backward": 0.0,
            "activation_mib": 125.0, "epoch_time_s": 30.0, "iter_s": 0.5,
            "config": {"trainer": {"epochs": 2, "batch_size": 128}}}
    base.update(fields)
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(base))


@pytest.fixture
def tree(tmp_path):
    ode = {"model": "odenet", "solver": "dopri5", "solver_desc": "dopri5 rtol=0.001 atol=0.001",
           "gradient": "adjoint", "params": 208266, "activation_mib": 85.0}
    write_run(tmp_path, "a/resnet_s0", seed=0, test_error=1.0, best_test_error=0.9)
    write_run(tmp_path, "a/resnet_s1", seed=1, test_error=2.0, best_test_error=1.1,
              epoch_time_s=32.0)
    write_run(tmp_path, "b/resnet_s2", seed=2, test_error=3.0, best_test_error=1.3,
              epoch_time_s=34.0)
    write_run(tmp_path, "b/odenet_s0", seed=0, test_error=1.5, best_test_error=1.5,
              nfe_forward=26.0, nfe_backward=32.0, **ode)
    write_run(tmp_path, "b/odenet_s1", seed=1, status="failed",
              error="max_num_steps exceeded (1000>=1000)", test_error=None,
              best_test_error=None, nfe_forward=None, nfe_backward=None, **ode)
    write_run(tmp_path, "b/mlp_s0", model="mlp", params=238510, test_error=1.7,
              best_test_error=1.7, activation_mib=0.5, epoch_time_s=2.5)
    return tmp_path


EXPECTED_TABLE1 = """\
| model   | solver / gradient                     | runs           | batch   | test error % (last)   | test error % (best)   | params   | activation MiB   | NFE-F   | NFE-B   | s / epoch    | s / iter | round trip | ref. error | valid | grad. error init / end | paper test error   | paper params   | paper memory   | paper time   |
|:--------|:--------------------------------------|:---------------|:--------|:----------------------|:----------------------|:---------|:-----------------|:--------|:--------|:-------------|:-------------------|:---------------|:---------------|:-------------|
| 1-layer MLP | -                                     | 1 ok           | 128 | 1.70                  | 1.70                  | 238,510  | 0.5              | -       | -       | 2.5          | 0.500 | - | - | - | - | 1.60%              | 0.24 M         | -              | -            |
| ResNet  | -                                     | 3 ok           | 128 | 2.00 ± 1.00           | 1.10 ± 0.20           | 576,778  | 125.0 ± 0.0      | -       | -       | 32.0 ± 2.0   | 0.500 ± 0.000 | - | - | - | - | 0.41%              | 0.60 M         | O(L)           | O(L)         |
| ODE-Net | dopri5 rtol=0.001 atol=0.001, adjoint | 1 ok, 1 failed | 128 | 1.50                  | 1.50                  | 208,266  | 85.0             | 26.0    | 32.0    | 30.0         | 0.500 | - | - | - | - | 0.42%              | 0.22 M         | O(1)           | O(L~)        |
"""


def test_collect_finds_every_run_sorted(tree):
    df = collect(tree)
    assert list(zip(df.model, df.seed)) == [("mlp", 0), ("resnet", 0), ("resnet", 1),
                                           ("resnet", 2), ("odenet", 0), ("odenet", 1)]


def test_aggregate_counts_failed_runs_and_never_averages_them(tree):
    agg = aggregate(collect(tree)).set_index("model")
    assert agg.loc["odenet", "runs"] == "1 ok, 1 failed"
    assert agg.loc["odenet", "test_error"] == "1.50"
    assert agg.loc["odenet", "failures"] == "max_num_steps exceeded (1000>=1000)"
    assert agg.loc["resnet", "test_error"] == "2.00 ± 1.00"   # mean and sample std of 1, 2, 3


def test_table1_exact(tree):
    got = to_markdown(table1(collect(tree)))
    # compare cell by cell; the separator row's dash counts depend on column widths
    expected_rows = [r.split("|")[1:-1] for i, r in
                     enumerate(EXPECTED_TABLE1.strip().splitlines()) if i != 1]
    got_rows = [r.split("|")[1:-1] for i, r in enumerate(got.strip().splitlines()) if i != 1]
    assert [[c.strip() for c in r] for r in got_rows] == \
        [[c.strip() for c in r] for r in expected_rows]


def test_table1_targets_and_contended_timings(tree):
    write_run(tree, "c/rknet_s0", model="rknet", solver="dopri5",
              solver_desc="dopri5 rtol=0.001 atol=0.001", gradient="direct", params=208266,
              test_error=0.69, best_test_error=0.69, contended=True, load_start=[3.1, 2, 1],
              load_end=[2.0, 2, 1], cores=2)
    df = collect(tree)
    t = table1(df, {"mlp": 1.9, "resnet": 0.55, "rknet": 0.7, "odenet": 0.7}).set_index("model")
    assert t.loc["1-layer MLP", "met"] == "yes" and t.loc["1-layer MLP", "target %"] == "<= 1.9"
    assert t.loc["ResNet", "met"] == "no"          # 1.0, 2.0, 3.0 > 0.55
    assert t.loc["RK-Net", "met"] == "yes"         # 0.69 <= 0.7
    assert t.loc["RK-Net", "s / epoch"] == "30.0 (contended)"
    assert t.loc["ODE-Net", "s / epoch"] == "30.0"  # its runs recorded no load: not marked
    from nodebench.report import budget_line

    assert "load average at the runs' starts and ends 2.00-3.10" in budget_line(df)
    assert "timings are marked contended" in budget_line(df)


def test_report_is_byte_identical_across_runs(tree, tmp_path):
    from nodebench.report import report_mnist

    a = report_mnist(tree, tmp_path / "out1")
    b = report_mnist(tree, tmp_path / "out2")
    assert a == b
    for name in ("table1.md", "table1.csv", "table1.tex", "runs.csv"):
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
    assert "## Failed runs" in a and "max_num_steps exceeded" in a


def test_report_cli(tree, tmp_path, capsys):
    from nodebench.cli import main

    assert main(["report", str(tree), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "table.md").exists()
    assert main(["report", str(tmp_path / "empty-nothing")]) == 2
    assert capsys.readouterr().err.strip().startswith("nodebench: error: no summary.json")


def test_report_skips_foreign_run_records_in_one_line(tree, capsys):
    # an ANODE/dynamics/latent driver's summary.json (no trainer config) crashed the report
    d = tree / "anode" / "g1d_node_r0"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"status": "ok", "task": "g1d", "loss": 1.0}))
    (tree / "broken").mkdir()
    (tree / "broken" / "summary.json").write_text("{not json")
    df = collect(tree)
    assert len(df) == 6                        # the six nodebench train runs, nothing else
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 2 run record(s)" in err[0]


def test_budget_counts_max_batches_and_rows_split_on_every_differing_setting(tmp_path):
    from nodebench.report import budget_line

    ode = {"model": "odenet", "solver": "dopri5", "solver_desc": "dopri5 rtol=0.001 atol=0.001",
           "gradient": "adjoint", "params": 208266, "epochs_done": 1}
    cfg = {"trainer": {"epochs": 1, "batch_size": 128, "max_batches": 3},
           "solver": {"max_num_steps": 1000}}
    write_run(tmp_path, "a/odenet_s0", seed=0, config=cfg, **ode)
    write_run(tmp_path, "a/odenet_s0_again", seed=0, config=cfg, test_error=5.0, **ode)
    write_run(tmp_path, "a/odenet_s1", seed=1, config=cfg, **ode)
    other = {"trainer": cfg["trainer"], "solver": {"max_num_steps": 50}}
    write_run(tmp_path, "b/odenet_s0", seed=0, config=other, **ode)
    df = collect(tmp_path)
    assert "(3 iterations)" in budget_line(df)      # 3 batches of 128, not "1 ep x 1,000 img"
    t = table1(df)
    assert sorted(t.model) == ["ODE-Net (solver.max_num_steps=1000)",
                               "ODE-Net (solver.max_num_steps=50)"]
    row = t.set_index("model").loc["ODE-Net (solver.max_num_steps=1000)"]
    assert row["runs"] == "2 ok"                    # seed 0 counted once (its last run kept)
    assert row["test error % (last)"] == "3.00 ± 2.83"   # mean/std of 5.0 and 1.0
