"""Sweeps through a real Slurm (hydra/launcher=slurm, Hydra's submitit launcher).

The cluster is a one-node sandbox on this machine started by scripts/slurm_local.sh (Debian
packages slurm-wlm and munge). Skipped where those are missing or the daemons cannot start.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug",
         "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
TINY = ["dataset=synthetic", "trainer.epochs=2", "trainer.max_batches=2", "trainer.batch_size=16",
        "trainer.eval_batch_size=64", "dataset.test_size=64", "trainer.progress=false"]


@pytest.fixture(scope="module")
def slurm_env():
    """Environment with SLURM_CONF of a running one-node cluster; skips if it cannot start.
    Runs only when asked for (NODEBENCH_TEST_SLURM=1, as `make test-slurm` does): the jobs take a
    minute or two, too long for every `make test`."""
    if os.environ.get("NODEBENCH_TEST_SLURM") != "1":
        pytest.skip("Slurm tests run with NODEBENCH_TEST_SLURM=1 (make test-slurm)")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("Slurm not installed (apt-get install -y slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the sandbox cluster runs slurmd as root")
    proc = subprocess.run(["bash", str(SCRIPT), "start"], check=False, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"Slurm could not start: {(proc.stderr or proc.stdout).strip()[-500:]}")
    conf = subprocess.run(["bash", str(SCRIPT), "env"], check=True, capture_output=True,
                          text=True)
    env = dict(os.environ, SLURM_CONF=conf.stdout.strip().split("=", 1)[1],
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def nodebench(env, tmp_path, *args, background=False):
    cmd = [sys.executable, "-m", "nodebench.cli", "train", *args]
    env = dict(env, NODEBENCH_RUNS=str(tmp_path / "runs"), NODEBENCH_DATA=str(tmp_path / "data"))
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_slurm_sweep_2_models_x_2_seeds(slurm_env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = nodebench(slurm_env, tmp_path, "-m", *SLURM, *TINY, "model=mlp,odenet", "seed=0,1",
                     f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == ["0_mlp_s0", "1_mlp_s1", "2_odenet_s0", "3_odenet_s1"]
    for name, s in summaries.items():
        assert s["status"] == "ok" and s["dataset"] == "synthetic"
        assert f"{s['model']}_s{s['seed']}" in name
        assert list(pd.read_csv(sweep / name / "metrics.csv").epoch) == [1, 2]
        assert (sweep / name / ".hydra" / "config.yaml").exists()
    # every job ran as a Slurm array task: submitit's logs per task
    assert len(list((sweep / ".submitit").glob("*_*/*_log.out"))) == 4
    assert summaries["2_odenet_s0"]["nfe_backward"] > 0


def test_preempted_slurm_job_requeues_and_resumes(slurm_env, tmp_path):
    """USR2 (submitit's pre-emption/time-out signal) makes the launcher's checkpoint() requeue
    the same job; the requeued job resumes from its last epoch checkpoint."""
    sweep = tmp_path / "sweep"
    run = sweep / "0_odenet_s0"
    # timeout_min=20: submitit calls a USR2 before 80% of the time limit a pre-emption
    proc = nodebench(slurm_env, tmp_path, "-m", *SLURM, "hydra.launcher.timeout_min=20",
                     "dataset=synthetic", "model=odenet",
                     "seed=0", "trainer.epochs=3", "trainer.max_batches=6",
                     "trainer.batch_size=16", "dataset.test_size=64", "trainer.progress=false",
                     f"hydra.sweep.dir={sweep}", background=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        job_id = next((sweep / ".submitit").glob("*/*_log.out")).parent.name
        subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_env, check=True)
        # Slurm holds a requeued batch job back (begin time ~2 min later); let it start now
        for _ in range(100):
            state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False,
                                   env=slurm_env, capture_output=True, text=True).stdout.strip()
            if state == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                               env=slurm_env, check=True)
                break
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            subprocess.run(["scancel", "--name=train"], check=False, env=slurm_env)
    assert proc.returncode == 0, out[-3000:]
    submitit_log = (sweep / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
    for line in ("Caught signal SIGUSR2", "this job is preempted", "Calling checkpoint method",
                 f"Requeued job {job_id}", "Job completed successfully"):
        assert line in submitit_log, submitit_log[-3000:]
    assert "resuming from epoch" in (run / "train.log").read_text()
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "ok" and s["epochs_done"] == 3
    assert list(pd.read_csv(run / "metrics.csv").epoch) == [1, 2, 3]
