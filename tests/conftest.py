import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock  # a dependency of torch

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot" / "images_background_small1.zip"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`make test` runs one worker per core) every worker, and every `metasgd` process a test
    # starts, computes on one thread: the workers already keep the cores busy, and more threads than cores only
    # makes them wait on each other. The variables reach the subprocesses through os.environ.
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup``, keep the tests that share a module-scoped fixture of their module on one worker.

    A module-scoped fixture (in-process fits, say) is computed once per worker that runs a test needing it; the tests
    sharing one, directly or through each other, get one ``xdist_group``, so it is computed once. Every other test is
    scheduled on its own. A session-scoped fixture that runs through :func:`once_per_session` is computed once for
    all workers, so its tests need no group. Runs before xdist turns the marks into groups.
    """
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared: dict[pytest.Item, list[str]] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        module = item.nodeid.split("::", 1)[0]
        keys = []
        for name in info.names_closure if info else ():
            for fixturedef in info.name2fixturedefs.get(name, ()):
                if fixturedef.scope == "module" and fixturedef.baseid.startswith(module):
                    keys.append(f"{module}::{name}")
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
        if keys:
            shared[item] = keys
    for item, keys in shared.items():
        item.add_marker(pytest.mark.xdist_group(find(keys[0])))


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> object:
    """``make(folder)``, computed once per test session in a new ``folder`` and shared by every pytest-xdist worker.

    For the expensive runs of session-scoped fixtures (a real-process ``metasgd fit``, a DDP launch): the first
    worker to ask runs it under a file lock in the session's temporary folder, the others wait and read its result
    (pickled). The tests using it may then run on any worker, side by side; they must only read ``folder``.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/, shared by the workers' own popen-gw<K>/
    folder, result = base / f"shared-{name}", base / f"shared-{name}.pickle"
    with FileLock(base / f"shared-{name}.lock"):
        if result.is_file():
            return pickle.loads(result.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
        folder.mkdir()
        value = make(folder)
        result.write_bytes(pickle.dumps(value))
        return value


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
