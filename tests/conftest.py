import os

import pytest
import torch

# Keep the suite light on a 2-core machine and independent of the user's data folder.
torch.set_num_threads(1)
os.environ.setdefault("NODEBENCH_DATA", "/nonexistent-nodebench-data")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    """A fresh runs/ folder (NODEBENCH_RUNS) for CLI tests; nothing lands in the repo."""
    path = tmp_path / "runs"
    monkeypatch.setenv("NODEBENCH_RUNS", str(path))
    monkeypatch.chdir(tmp_path)
    return path
