"""Real processes for the tests without Python's imports each time: ``python -m module ...`` forked from a server.

The tests of what only a process shows (its exit status, a signal to its process group, DataLoader workers, a kill
in the middle of a write, a DDP launch) run ``python -m metasgd_lightning ...`` or a script in a new process. Each
new interpreter spends about four seconds of CPU importing torch, Lightning and torchmetrics before it does anything,
and the suite starts dozens. :func:`run_python` gives the same process without that cost: a server (one per
start-up environment, see :data:`STARTUP_VARIABLES`, in each pytest process) imports those libraries once, runs
nothing, and forks a child per run. The child becomes the run, as the interpreter would have started it: a new
session (signals to its group reach it and its own workers, never the server or pytest), the working directory,
the whole environment, ``sys.argv``, ``sys.path[0]``, standard input from /dev/null and standard output and error
into files; then :mod:`runpy` runs the module or script as ``__main__`` and the child ends as any interpreter
does (``SystemExit`` and its status, an uncaught exception's traceback and status 1, atexit handlers, a signal's
death). The server reports the exit status as :func:`subprocess.run` does (``-N`` for death by signal N), once
no live process of the run's session is left (``subprocess.run`` waits, in the same way, for every process that
holds its output pipes: a DDP rank that hangs after rank 0 has ended is a timeout, not a pass).

What a forked run does not show is the interpreter's start: the preloaded libraries are not imported again, so
their import-time output and warnings are not seen (the environment variables they set are set again in each
run, see :func:`preloaded_environment`), the collector leaves their objects alone (``gc.freeze``), and every run
has the server's string-hash seed (numpy's global generator is reseeded, and ``random`` reseeds itself after a
fork). Tests of the start (import noise, lazy imports) ask for a fresh interpreter (``fresh=True``), as does any
call with an interpreter option.

Run as a script, this file is the server: it answers ``ready <environment set by the imports, as JSON>`` once it
has imported the libraries, then reads one JSON request per line on standard input and answers ``pid <pid>``
once the child is forked and ``exit <status>`` when the run has ended, one run at a time.
"""

from __future__ import annotations

import atexit
import errno
import gc
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

#: What the server imports before it forks: the seconds of every ``metasgd`` start-up (torch, torchmetrics,
#: Lightning). Our own packages are left to each run (a tenth of a second), so the run imports the tree as it is.
PRELOAD = ("torch", "lightning")

#: Prefixes of the environment variables read while the interpreter starts or the preloaded libraries import
#: (``PYTHONWARNINGS``, the locale of the standard streams, thread counts, torch's and Lightning's settings, the
#: rank variables Lightning's ``rank_zero_only`` reads). Runs whose values of these differ get different servers;
#: every other variable is set in the child before the run starts. ``PYTHONPATH`` is the exception: the server
#: starts without it and each run puts its entries where the interpreter would.
STARTUP_VARIABLES = ("PYTHON", "LANG", "LC_", "OMP_", "MKL_", "KMP_", "GOMP_", "TORCH", "PYTORCH_", "CUDA", "NCCL_",
                     "LD_", "MALLOC", "PL_", "LIGHTNING_", "POSSIBLE_USER_WARNINGS", "MPL", "TMPDIR", "RANK",
                     "LOCAL_RANK", "SLURM_", "JSM_")


def run_python(args: Sequence[str], *, cwd: str | os.PathLike, env: Mapping[str, str], timeout: float,
               fresh: bool = False) -> subprocess.CompletedProcess:
    """``python ARGS`` in a new process, as ``subprocess.run([sys.executable, *ARGS], cwd=..., env=...,
    capture_output=True, text=True, timeout=..., start_new_session=True)`` would run it, forked from a server that
    has imported torch and Lightning already.

    Args:
        args: ``["-m", module, *argv]`` or ``[script, *argv]``; any other interpreter option, or ``fresh=True``,
            starts a fresh interpreter instead.
        cwd: the working directory (a relative one is taken from this process's).
        env: the whole environment of the run.
        timeout: seconds; past them the run's process group is killed and :class:`subprocess.TimeoutExpired` raised.

    Example::

        proc = run_python(["-m", "metasgd_lightning", "--help"], cwd=".", env=os.environ, timeout=60)
        assert proc.returncode == 0 and "fit" in proc.stdout
    """
    args, env = [str(arg) for arg in args], dict(env)
    if not os.path.isdir(cwd):  # as subprocess.run says it
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(cwd))
    if fresh or not args or (args[0].startswith("-") and args[0] != "-m") or (args[0] == "-m" and len(args) < 2):
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    return _server(env).run(args, cwd=os.path.abspath(cwd), env=env, timeout=timeout)


def preloaded_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The variables the preloaded libraries set in the environment as they import (Lightning sets some): the
    server for ``env`` applies them to every run over the requested environment, as those imports would."""
    return dict(_server(env).ready())


def _startup(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(STARTUP_VARIABLES) and k != "PYTHONPATH"))


_servers: dict[tuple, _Server] = {}
_lock = threading.Lock()


def _server(env: Mapping[str, str]) -> _Server:
    key = _startup(env)
    with _lock:
        server = _servers.get(key)
        if server is None or server.process.poll() is not None:
            server = _servers[key] = _Server(env)
        return server


class _Server:
    """The client side: one server process, one run at a time."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.log = tempfile.TemporaryFile()  # the server's own stderr, shown if it fails
        env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, env=env, cwd=Path(__file__).parent)
        self.lock = threading.Lock()
        self.buffer = b""
        self.imports_set: dict[str, str] | None = None

    def ready(self) -> dict[str, str]:
        """Wait for the server's imports (a few seconds, once); what they set in the environment."""
        if self.imports_set is None:
            answer = self._answer("ready", time.monotonic() + 300)
            if answer is None:
                self.process.kill()
                raise RuntimeError("the forked-python server did not import its libraries in 300 s")
            self.imports_set = json.loads(answer)
        return self.imports_set

    def run(self, args: list[str], *, cwd: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        with self.lock, tempfile.TemporaryDirectory(prefix="forked-python-") as folder:
            self.ready()
            out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
            request = {"args": args, "cwd": cwd, "env": env, "stdout": out, "stderr": err}
            pid, status = None, None
            try:
                self.process.stdin.write(json.dumps(request).encode() + b"\n")
                self.process.stdin.flush()
                answer = self._answer("pid", time.monotonic() + 60)
                if answer is None:
                    raise RuntimeError("the forked-python server did not fork in 60 s")
                pid = int(answer)
                answer = self._answer("exit", time.monotonic() + timeout)
                if answer is None:
                    _kill_group(pid)  # the run and its own processes
                    answer = self._answer("exit", time.monotonic() + 60)
                    if answer is None:
                        raise RuntimeError(f"the run's processes (session {pid}) outlived SIGKILL by 60 s")
                else:
                    status = int(answer)
            except BaseException:
                # pytest interrupted, or the server lost: no run outlives this, and the server, whose answers may
                # now be out of step, is replaced at the next run.
                if pid is not None:
                    _kill_group(pid)
                self.process.kill()
                raise
            stdout, stderr = (Path(path).read_text(errors="replace") for path in (out, err))
            if status is None:
                raise subprocess.TimeoutExpired([sys.executable, *args], timeout, stdout, stderr)
            return subprocess.CompletedProcess([sys.executable, *args], status, stdout, stderr)

    def _answer(self, word: str, deadline: float) -> str | None:
        """The server's next answer, which must be ``word``; None if none came by ``deadline``."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"\n" not in self.buffer:
                if not selector.select(max(0.0, deadline - time.monotonic())):
                    return None
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    self.log.seek(0)
                    raise RuntimeError(f"the forked-python server ended (status {self.process.wait()}):\n"
                                       f"{self.log.read().decode(errors='replace')[-3000:]}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        got, value = line.decode().split(" ", 1)
        assert got == word, f"forked-python server: expected {word!r}, got {line!r}"
        return value

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the server ends at the end of its input
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _close_servers() -> None:
    for server in _servers.values():
        server.close()


# The server ------------------------------------------------------------------------------------------------------


def _serve() -> dict:
    """Answer requests until the input ends (then exit); in each forked child, return its request."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)  # stray prints of an import go to stderr, not the answers
    os.dup2(2, 1)
    before = dict(os.environ)
    for name in PRELOAD:
        __import__(name)
    imports_set = {k: v for k, v in os.environ.items() if before.get(k) != v}
    # The preloaded objects live as long as any run: the collector skips them from now on, in the runs' collections
    # and at their exit (a second of each run's end goes to collecting them otherwise).
    gc.freeze()
    print("ready", json.dumps(imports_set), file=answers)
    for line in sys.stdin.buffer:
        request = json.loads(line)
        request["env"].update(imports_set)  # as the imports would have set them in a fresh interpreter
        sys.stdout.flush()  # nothing buffered before the fork may reach a run's output
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            return request
        print("pid", pid, file=answers)
        _, status = os.waitpid(pid, 0)
        while _session_alive(pid):  # what the run started and left running (killed by the client at its timeout)
            time.sleep(0.02)
        print("exit", os.waitstatus_to_exitcode(status), file=answers)
    sys.exit(0)


def _session_alive(session: int) -> bool:
    """Whether a process of ``session`` still runs (zombies, which the init process may never reap, do not)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            if fields[0] != "Z" and int(fields[3]) == session:  # state, ppid, pgrp, session
                return True
    return False


def _become(request: dict) -> None:
    """Turn this forked child into the requested run, up to the moment ``runpy`` starts it."""
    os.setsid()
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)  # the run's standard input, for its whole life
    os.chdir(request["cwd"])  # after the streams: a missing folder is the run's error, on its stderr
    os.environ.clear()
    os.environ.update(request["env"])
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a new interpreter's global generator, not the server's
    args = request["args"]
    if args[0] == "-m":
        sys.argv, first = ["-m", *args[2:]], os.getcwd()  # runpy sets argv[0] to the module's file
    else:
        sys.argv, first = args, os.path.dirname(os.path.realpath(args[0]))
    sys.path[:1] = [first, *(entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry)]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in pytest's terminal ends pytest, which ends this
    _request = _serve()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _become(_request)
    import runpy

    if _request["args"][0] == "-m":
        runpy.run_module(_request["args"][1], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(_request["args"][0], run_name="__main__")
