"""Issue 16: every bad input is one `nodebench: error:` line, exit status 2 and nothing written;
every numerical failure is a failed run; run folders never collide or contradict their records;
fixed-step grids take the whole number of steps; the data paths do not depend on the cwd."""

import gzip
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from nodebench import config as C
from nodebench import implicit
from nodebench.cli import main
from nodebench.data import MNIST_FILES, check_mnist_folder
from nodebench.errors import ConfigError, SolverFailure, classify_solver_error
from nodebench.solvers import Gradient, Solver, fixed_step_count, odesolve

TINY = ["dataset=synthetic", "trainer.epochs=2", "trainer.max_batches=2",
        "trainer.batch_size=16", "trainer.eval_batch_size=64", "trainer.progress=false",
        "dataset.test_size=64"]
NO_DATASET = [o for o in TINY if not o.startswith("dataset=")]
IMPLICIT = ["model=odenet", "solver=implicit_euler", "solver.step_size=0.25"]


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


def refused(capsys, runs_dir, args, message, before=None):
    """Run ``nodebench train ARGS``; assert exit 2, one error line holding ``message`` on
    stderr, no traceback, and that nothing under runs_dir changed."""
    before = all_files(runs_dir) if before is None else before
    code = main(["train", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("nodebench: error:") and message in err[0], err[0]
    assert "Traceback" not in err[0] and "Config search path" not in err[0]
    assert all_files(runs_dir) == before
    return err[0]


# ------------------------------------------------------------------------- 2. bad input

BAD = [
    # values of solver options
    ([*IMPLICIT, "solver.options.max_iters=-3"],
     "solver.options.max_iters must be an integer >= 1"),
    ([*IMPLICIT, "solver.options.anderson=-1"], "solver.options.anderson must be an integer >= 0"),
    ([*IMPLICIT, "solver.options.tol=abc"], "solver.options.tol must be a positive number"),
    (["model=odenet", "+solver.options.first_step=abc"],
     "solver.options.first_step must be a positive number"),
    (["model=odenet", "solver.options.safety=2"], "solver.options.safety must be a number in"),
    (["model=odenet", "solver=rk4", "solver.step_size=0.25", "solver.options.interp=quadratic"],
     "solver.options.interp must be linear or cubic"),
    # numeric options: type and range
    (["model=odenet", "solver=rk4", "solver.step_size=5"],
     "larger than the integration interval [0, 1]"),
    (["model=odenet", "model.t1=-1"], "model.t1 (the integration interval [0, t1])"),
    (["model=odenet", "model.t1=abc"], "model.t1 (the integration interval [0, t1])"),
    (["trainer.threads=0"], "trainer.threads must be a positive integer or null"),
    (["trainer.log_every=0"], "trainer.log_every must be a positive integer"),
    (["trainer.instruments.memory_every=0"],
     "trainer.instruments.memory_every must be a positive integer"),
    (["trainer.instruments.nfe=maybe"], "trainer.instruments.nfe must be true or false"),
    (["trainer.batch_size=abc"], "trainer.batch_size must be a positive integer"),
    (["dataset.train_size=abc"], "dataset.train_size must be a positive integer"),
    (["dataset.train_size=0"], "dataset.train_size must be a positive integer"),
    (["trainer.batch_size=1000"], "trainer.batch_size 1000 exceeds the 512 training images"),
    # tolerances given to fixed-step solvers (they would be ignored)
    (["model=odenet", "solver=rk4", "solver.step_size=0.25", "solver.rtol=1e-4"],
     "solver.rtol and solver.atol apply to adaptive methods"),
    ([*IMPLICIT, "solver.atol=1e-6"], "solver.rtol and solver.atol apply to adaptive methods"),
    # misspelled keys, with and without +
    (["solver.rtoll=1e-3"], "Could not override 'solver.rtoll': no such key; valid keys in solver"),
    (["+trainer.epoch=3"], "unknown key trainer.epoch"),
    (["+dataset.trian_size=10"], "unknown key dataset.trian_size"),
    (["+sed=5"], "unknown key sed"),
    # Hydra's own keys
    (["hydra.run.dri=x"], "Could not override 'hydra.run.dri'"),
    (["hydra/launcher=foo"], "Could not find 'hydra/launcher/foo'"),
    (["model=nosuch"], "Could not find 'model/nosuch'"),
    # a multirun whose later job is invalid: refused before job 0 runs
    (["-m", "trainer.batch_size=16,100000"], "trainer.batch_size 100000 exceeds the 512"),
    (["-m", "model=mlp,odenet", "solver.options.tol=1"], "unknown option(s) tol"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_one_line_exit_2_nothing_written(runs_dir, capsys, overrides, message):
    line = refused(capsys, runs_dir, [*TINY, *overrides], message)
    if "rtoll" in overrides[0]:
        assert "rtol" in line.split("valid keys in solver:")[1] and "To append" not in line


def test_mnist_train_size_above_the_full_set_is_refused(runs_dir, capsys):
    refused(capsys, runs_dir, [*NO_DATASET, "dataset=mnist", "dataset.train_size=100000"],
            "dataset.train_size=100000 exceeds the 60000 images")


def test_unknown_group_option_lists_the_choices_without_search_path(runs_dir, capsys):
    line = refused(capsys, runs_dir, [*TINY, "solver=nosuch"], "Could not find 'solver/nosuch'")
    assert "dopri5" in line and "provider=" not in line


def test_solver_option_without_plus_is_accepted(runs_dir, capsys):
    for override in ("solver.options.first_step=0.05", "+solver.options.first_step=0.05"):
        assert main(["train", *TINY, "model=odenet", override, "--cfg", "job"]) == 0
        assert "first_step: 0.05" in capsys.readouterr().out
    assert not runs_dir.exists() or not any(runs_dir.rglob("*"))


def test_cfg_job_says_when_a_run_would_be_refused(runs_dir, capsys):
    code = main(["train", *TINY, "model=odenet", "solver=rk4", "--cfg", "job"])
    out, err = capsys.readouterr()
    assert code == 2 and "method: rk4" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nodebench: error:")
    assert "set solver.step_size" in lines[0] and "would be refused" in lines[0]


def test_run_dir_under_a_regular_file_is_refused(runs_dir, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    refused(capsys, runs_dir, [*TINY, "model=mlp", f"hydra.run.dir={blocker}/run"],
            "is not a folder")
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_dir_is_refused(runs_dir, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(capsys, runs_dir, [*TINY, "model=mlp", f"hydra.run.dir={locked}/run"],
                "is not writable")
    finally:
        locked.chmod(0o755)
    assert not (locked / "run").exists()


def write_truncated_mnist(root: Path) -> Path:
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for name in MNIST_FILES:
        whole = gzip.compress(bytes(range(256)) * 64)
        (folder / f"{name}.gz").write_bytes(whole[: len(whole) // 2])
    return folder


def test_truncated_gz_names_the_file_and_the_fix(tmp_path):
    folder = write_truncated_mnist(tmp_path / "data")
    with pytest.raises(ConfigError, match="truncated or corrupt") as info:
        check_mnist_folder(folder)
    assert str(folder) in str(info.value) and "nodebench data mnist" in str(info.value)


def test_error_after_the_data_loads_is_one_line_on_stderr(runs_dir, capsys, tmp_path,
                                                          monkeypatch):
    """Corrupt files are found when the data loads (after Hydra made the folder): still the
    error line on stderr, exit 2, and the folder removed."""
    monkeypatch.setenv("NODEBENCH_DATA", str(tmp_path / "data"))
    write_truncated_mnist(tmp_path / "data")
    code = main(["train", *NO_DATASET, "dataset=mnist", "model=mlp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("nodebench: error:")
    assert "truncated or corrupt" in err[0] and "nodebench data mnist" in err[0]
    assert not any(runs_dir.rglob("summary.json")) and not any(runs_dir.rglob("*.tfevents*"))


# ------------------------------------------------------------------- 1. numerical failures

def test_non_finite_state_is_a_failed_run_not_a_traceback(runs_dir):
    """The issue's input: lr 1e30 drives the ODE state to inf/NaN (torchdiffeq's "non-finite
    values in state" assertion, an underflow in dt, or a NaN loss): a failed run with a reason."""
    code = main(["train", *TINY, "model=odenet", "optim.optimizer.lr=1e30",
                 "+solver.options.first_step=0.05"])
    assert code == 1
    (summary,) = [json.loads(p.read_text()) for p in runs_dir.rglob("summary.json")]
    assert summary["status"] == "failed" and summary["error"]
    assert "tensor(" not in summary["error"] and len(summary["error"]) <= 400


@pytest.mark.parametrize("exc,expected", [
    (AssertionError("max_num_steps exceeded (10>=10)"), "max_num_steps exceeded"),
    (AssertionError("underflow in dt 0.0"), "underflow in dt"),
    (AssertionError("non-finite values in state `y`: tensor([nan, 1.])"),
     "non-finite values in state"),
    (SolverFailure("implicit_euler step at t=0.5: fixed-point iteration did not converge"),
     "did not converge"),
    (SolverFailure("non-finite loss (nan) at epoch 1, iteration 0"), "non-finite loss"),
    (torch.linalg.LinAlgError("linalg.solve: The solver failed because the input matrix is "
                              "singular."), "singular"),
])
def test_numerical_failures_are_classified(exc, expected):
    reason = classify_solver_error(exc)
    assert reason is not None and expected in reason and "tensor(" not in reason
    assert "\n" not in reason


@pytest.mark.parametrize("exc", [AssertionError("t must be one dimensional"), KeyError("x"),
                                 RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                                 TypeError("bad")])
def test_other_errors_are_bugs_and_re_raised(exc):
    assert classify_solver_error(exc) is None


# --------------------------------------------------------------------------- 3. run folders

def test_runs_started_in_the_same_second_never_share_a_folder(runs_dir):
    args = ["train", *TINY, "model=mlp", "trainer.epochs=1", "seed=7"]
    assert main(args) == 0 and main(args) == 0
    folders = sorted(p.parent for p in runs_dir.rglob("summary.json"))
    assert len(folders) == 2 and folders[0] != folders[1]
    # each folder holds its own run's event files only (the scalars' and the hparams' ones)
    counts = [len(list(folder.glob("events.out.tfevents.*"))) for folder in folders]
    assert counts[0] == counts[1] and counts[0] >= 1


def test_other_config_in_a_finished_folder_is_refused_and_rewrites_nothing(runs_dir, capsys):
    run_dir = runs_dir / "fixed"
    args = [*TINY, "model=mlp", "trainer.epochs=1", f"hydra.run.dir={run_dir}"]
    assert main(["train", *args]) == 0
    capsys.readouterr()
    snapshot = {p: p.read_bytes() for p in all_files(run_dir) if p.is_file()}
    refused(capsys, runs_dir, [*args, "trainer.epochs=2"],
            "holds a finished run of another configuration (trainer.epochs differ)")
    assert {p: p.read_bytes() for p in all_files(run_dir) if p.is_file()} == snapshot
    # the same config again: not rerun, exit 0
    assert main(["train", *args]) == 0


def test_run_folder_is_printed_at_start_and_end(runs_dir):
    run_dir = runs_dir / "printed"
    assert main(["train", *TINY, "model=mlp", "trainer.epochs=1",
                 f"hydra.run.dir={run_dir}"]) == 0
    log = (run_dir / "train.log").read_text()
    assert f"run folder: {run_dir.resolve()}" in log
    assert f"run ok; results in {run_dir.resolve()}" in log


def test_data_and_run_paths_do_not_depend_on_the_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("NODEBENCH_DATA", raising=False)
    monkeypatch.delenv("NODEBENCH_RUNS", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = C.compose(["dataset=mnist"])
    project = Path(C.CONF_DIR).resolve().parent
    assert Path(cfg.paths.data) == project / "data"
    assert Path(cfg.paths.runs) == project / "runs"
    assert Path(cfg.dataset.root) == project / "data" / "mnist"


# ------------------------------------------------------------------------ 4. fixed-step grids

GRID = [(0.3, 0.1, 3), (0.7, 0.1, 7), (1.1, 0.1, 11), (2.3, 0.1, 23), (0.9, 0.3, 3),
        (0.6, 0.2, 3), (1.0, 0.1, 10), (0.35, 0.05, 7), (1.0, 0.25, 4), (3.0, 0.3, 10),
        (1.0, 0.3, 4), (1.0, 0.4, 3), (0.5, 1.0, 1)]


@pytest.mark.parametrize("t1,h,n", GRID)
def test_fixed_step_count(t1, h, n):
    assert fixed_step_count(0.0, t1, h) == n
    assert fixed_step_count(t1, 0.0, h) == n
    assert fixed_step_count(0.0, t1, h, torch.finfo(torch.float32).eps) == n
    t32 = float(torch.tensor(t1, dtype=torch.float32))  # t1 as a float32 time holds it
    assert fixed_step_count(0.0, t32, h, torch.finfo(torch.float32).eps) == n


class Decay(nn.Module):
    """y' = -y, counting its evaluations."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return -y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t1,h,n", GRID)
def test_torchdiffeq_grid_takes_the_whole_number_of_steps(t1, h, n, dtype):
    func = Decay()
    y0 = torch.ones(2, dtype=dtype)
    t = torch.tensor([0.0, t1], dtype=dtype)
    out = odesolve(func, y0, t, Solver("euler", step_size=h), Gradient("direct"))
    assert func.calls == n
    if abs(t1 / h - n) < 1e-6:  # h divides the interval: n equal steps of h
        assert math.isclose(float(out[-1, 0]), (1 - h) ** n, rel_tol=1e-5)


@pytest.mark.parametrize("method", ["implicit_euler", "crank_nicolson", "trapezoid"])
@pytest.mark.parametrize("t1,h,n", GRID)
def test_implicit_grid_takes_the_whole_number_of_steps(method, t1, h, n):
    for dtype in (torch.float32, torch.float64):
        grid = implicit._grid(torch.tensor([0.0, t1], dtype=dtype), h)
        assert [step[3] for step in grid] == [n]
    implicit.STATS.take()
    odesolve(Decay(), torch.ones(2, dtype=torch.float64),
             torch.tensor([0.0, t1], dtype=torch.float64),
             Solver(method, step_size=h), Gradient("direct"))
    assert implicit.STATS.take()["forward_steps"] == n


def test_implicit_solver_refuses_t_that_requires_grad():
    t = torch.tensor([0.0, 1.0], requires_grad=True)
    with pytest.raises(ConfigError, match="no gradient for the time points"):
        odesolve(Decay(), torch.ones(2), t, Solver("implicit_euler", step_size=0.25),
                 Gradient("direct"))


@pytest.mark.parametrize("options,message", [
    ({"max_iters": -3}, "max_iters must be an integer >= 1"),
    ({"max_iters": 2.5}, "max_iters must be an integer >= 1"),
    ({"anderson": -1}, "anderson must be an integer >= 0"),
    ({"tol": "abc"}, "tol must be a positive number"),
    ({"tol": 0}, "tol must be a positive number"),
])
def test_implicit_options_are_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        Solver("implicit_euler", step_size=0.25, options=options)


def test_tolerances_belong_to_methods_that_read_them():
    with pytest.raises(ConfigError, match="apply to adaptive methods"):
        Solver("rk4", step_size=0.25, rtol=1e-4)
    assert Solver("implicit_adams", step_size=0.25, rtol=1e-4).rtol == 1e-4
    assert Solver("dopri5").rtol == 1e-3


def test_nfe_switch_off_counts_and_writes_no_nfe(runs_dir):
    # trainer.instruments.nfe=false was accepted and ignored: NFE were still counted and written
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", *TINY, "model=odenet", "trainer.instruments.nfe=false",
                 "trainer.instruments.validity=false", "trainer.instruments.gradient_error=false",
                 f"hydra.run.dir={runs_dir}/off"]) == 0
    summary = json.loads((runs_dir / "off" / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["nfe_forward"] is None and summary["nfe_backward"] is None
    assert summary["nfe_eval"] is None
    acc = EventAccumulator(str(runs_dir / "off"))
    acc.Reload()
    assert not [t for t in acc.Tags()["scalars"] if "nfe" in t]


def test_report_only_without_run_records_is_refused(runs_dir, capsys):
    """``nodebench reproduce NAME --report-only`` before any run: one error line, exit 2, no
    results folder written."""
    from nodebench.cli import main

    assert main(["reproduce", "dupont2019_images", "profile=tiny", "--report-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nodebench: error: --report-only: no run records")
    assert not (runs_dir / "anode").exists() and not (runs_dir / "dupont2019_images-tiny").exists()
