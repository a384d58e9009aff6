import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot" / "images_background_small1.zip"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def run_cli(*args: str, cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m metasgd_lightning ARGS`` in a subprocess, as a user would run ``metasgd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "metasgd_lightning", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"metasgd {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
