import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock  # a dependency of torch

from forked_python import run_python

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot" / "images_background_small1.zip"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`make test` runs one worker per core) every worker, and every `metasgd` process a test
    # starts, computes on one thread: the workers already keep the cores busy, and more threads than cores only
    # makes them wait on each other. The variables reach the subprocesses through os.environ.
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


#: The file (plus ``.<worker>``) in which each pytest-xdist worker tells the controller its tests' groups and costs.
_PLAN_VARIABLE = "METASGD_TEST_PLAN"


def pytest_configure(config):
    config.addinivalue_line("markers", "cost(seconds): the test's rough duration on one idle core, its share of "
                            "shared fixtures included; under pytest-xdist the costliest work units start first")
    if os.environ.get("PYTEST_XDIST_WORKER") or not config.pluginmanager.hasplugin("xdist"):
        return
    if config.getoption("dist", "no") == "loadgroup" and config.getoption("numprocesses", None):
        folder = tempfile.mkdtemp(prefix="metasgd-test-plan-")
        os.environ[_PLAN_VARIABLE] = os.path.join(folder, "plan")  # the workers, started after this, inherit it
        config.pluginmanager.register(_SchedulerPlugin(folder), "metasgd-test-scheduler")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup``, keep the tests that share a module- or session-scoped fixture of their module on
    one worker.

    A module-scoped fixture (in-process fits, say) is computed once per worker that runs a test needing it; the tests
    sharing one, directly or through each other, get one ``xdist_group``, so it is computed once. Every other test is
    scheduled on its own. A session-scoped fixture that runs through :func:`once_per_session` is computed once for
    all workers, but a worker that asks for it while the other computes it waits, idle, on its lock (10-15 s in a
    full run): its tests are grouped too. Runs before xdist turns the marks into groups.

    pytest-xdist 3.8 reads a group from the test's node id, which it extends with ``@<group>`` by a private attribute
    that pytest 9 no longer reads: the groups were silently ignored. So each worker also writes its tests' groups,
    and their ``cost`` marks, to a file that the scheduler of :class:`_SchedulerPlugin` reads in the controller.
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
                if fixturedef.scope in ("module", "session") and fixturedef.baseid.startswith(module):
                    keys.append(f"{module}::{name}")
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
        if keys:
            shared[item] = keys
    for item, keys in shared.items():
        item.add_marker(pytest.mark.xdist_group(find(keys[0])))

    plan, worker = os.environ.get(_PLAN_VARIABLE), os.environ.get("PYTEST_XDIST_WORKER")
    if plan and worker:
        tests = {}
        for item in items:
            group = item.get_closest_marker("xdist_group")
            cost = item.get_closest_marker("cost")
            tests[item.nodeid] = [group.args[0] if group and group.args else None, cost.args[0] if cost else 0]
        Path(f"{plan}.{worker}.tmp").write_text(json.dumps(tests))
        os.replace(f"{plan}.{worker}.tmp", f"{plan}.{worker}")


class _SchedulerPlugin:
    """Registered in the pytest-xdist controller under ``--dist loadgroup``: schedules by ``PlanScheduling``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config, log):
        from xdist.scheduler import LoadGroupScheduling  # the controller has pytest-xdist: it registered this

        class PlanScheduling(LoadGroupScheduling):
            """``--dist loadgroup`` with the groups the workers wrote (see :func:`pytest_collection_modifyitems`),
            the work unit with the highest summed ``cost`` marks handed out next (ties in collection order): the long
            real-process runs start first and the many short tests fill in at the end, so the workers end together.
            """

            def __init__(self, config, log=None) -> None:
                super().__init__(config, log)
                config.option.loadscopereorder = False  # units in collection order; _CostliestFirst picks among them
                self.workqueue = _CostliestFirst(self._cost)
                self._plan: dict[str, list] | None = None

            def _planned(self, nodeid: str) -> list:
                if self._plan is None:
                    folder, name = os.path.split(os.environ[_PLAN_VARIABLE])
                    files = sorted(f for f in os.listdir(folder) if f.startswith(name + ".") and not f.endswith(".tmp"))
                    self._plan = json.loads(Path(folder, files[0]).read_text()) if files else {}
                return self._plan.get(nodeid, [None, 0])

            def _cost(self, work_unit: dict[str, bool]) -> float:
                return sum(self._planned(nodeid)[1] for nodeid in work_unit)

            def _split_scope(self, nodeid: str) -> str:
                group = self._planned(nodeid)[0]
                return group if group is not None else super()._split_scope(nodeid)

        return PlanScheduling(config, log)

    def pytest_unconfigure(self, config):
        shutil.rmtree(self.folder, ignore_errors=True)


class _CostliestFirst(OrderedDict):
    """pytest-xdist's queue of work units (``scope -> {nodeid: done}``); ``popitem(last=False)``, the scheduler's
    "next unit", gives the costliest unit, the earliest of equally costly ones."""

    def __init__(self, cost: Callable[[dict], float]) -> None:
        super().__init__()
        self.cost = cost

    def popitem(self, last: bool = True):
        if last or not self:
            return super().popitem(last)
        scope = max(self, key=lambda scope: self.cost(self[scope]))  # the first of the maxima
        return scope, self.pop(scope)


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> object:
    """``make(folder)``, computed once per test session in a new ``folder`` and shared by every pytest-xdist worker.

    For the expensive runs of session-scoped fixtures (a real-process ``metasgd fit``, a DDP launch): the first
    worker to ask runs it under a file lock in the session's temporary folder, the others wait and read its result
    (pickled). They must only read ``folder``. Under ``--dist loadgroup`` the tests of the fixture's own module run on
    one worker (:func:`pytest_collection_modifyitems`), so that no worker waits on the lock; tests of other modules
    may use it from any worker.
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


def run_cli(*args: str, cwd: Path, timeout: float = 300, check: bool = True, fresh: bool = False
            ) -> subprocess.CompletedProcess:
    """Run ``python -m metasgd_lightning ARGS`` in a new process, as a user would run ``metasgd``: forked from a
    process that has imported torch and Lightning (:mod:`forked_python`), or with ``fresh=True`` a new interpreter,
    for what its imports print too."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = run_python(["-m", "metasgd_lightning", *args], cwd=cwd, env=env, timeout=timeout, fresh=fresh)
    if check and proc.returncode != 0:
        raise AssertionError(f"metasgd {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def fit_tiny_omniglot(root: Path, cwd: Path, *extra: str) -> None:
    """``metasgd fit`` in this process: 2 meta-steps of 3-way 1-shot tasks from the Omniglot-layout folder ``root``
    (``fixtures_episodic.omniglot_folder``), 2 tasks per meta-step, no DataLoader workers; ``extra`` sets the rest
    (the model's size, where the checkpoints go)."""
    run_in_process("fit", "--config", str(REPO / "configs/omniglot_5way_1shot.yaml"), "--data.root", str(root),
                   "--data.layout", "folder", "--data.fractions", "[0.5, 0.25, 0.25]", "--data.ways", "3",
                   "--data.download", "false", "--data.meta_batch_size", "2", "--data.num_workers", "0",
                   "--trainer.max_steps", "2", "--trainer.enable_model_summary", "false", *extra, cwd=cwd)


def run_in_process(*args: str, cwd: Path, check: bool = True, program: str = "metasgd") -> subprocess.CompletedProcess:
    """``metasgd ARGS`` through its entry point in this process, as :func:`run_cli` runs it in a new one but without
    the seconds of an interpreter's start-up: for tests of what a command does and says, not of the process itself.

    Gives what the process would: the exit status (a ``SystemExit`` message: status 1 and the message on stderr, as
    Python prints it; an uncaught exception: status 1 and its traceback on stderr) and what was written to stdout
    and stderr, Lightning's log lines included. ``program`` is ``sys.argv[0]`` (``python -m metasgd_lightning``
    gives the path of its ``__main__.py``).
    """
    from metasgd_lightning.commands.cli import main

    out, err = io.StringIO(), io.StringIO()
    # Lightning's loggers, also under the names of its standalone packages (pytorch_lightning, imported by a third
    # party in some tests, logs Lightning's lines under its own name in this process from then on).
    names = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]  # a test (a benchmark's quiet()) may have raised them
    handler = logging.StreamHandler(err)
    argv, sys.argv = sys.argv, [program]  # as the console script calls main()
    try:
        for logger in loggers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)  # Lightning's own level, as a fresh process has it
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as exit_:
                code = exit_.code
            except Exception:  # noqa: BLE001 - what the interpreter does with it: a traceback and status 1
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = argv
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        err.write(f"{code}\n")
        code = 1
    proc = subprocess.CompletedProcess(["metasgd", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"metasgd {' '.join(args)} failed ({code}):\n{proc.stdout}\n{proc.stderr}")
    return proc
