"""The forked runs of ``forked_python`` are the processes a fresh interpreter would give, as far as a run can see.

Each case runs a small script (no torch, so the fresh interpreter is cheap) both ways and compares what the run
saw of itself and how it ended.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from forked_python import preloaded_environment, run_python

SELF_REPORT = textwrap.dedent("""
    import json, os, sys
    import __main__
    print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "env": dict(os.environ),
                      "spec": getattr(__main__.__spec__, "name", None), "main_file": __main__.__file__,
                      "session_leader": os.getsid(0) == os.getpid(), "stdin": sys.stdin.read(),
                      "extra_path": [p for p in sys.path if p.startswith(os.environ.get("EXTRA", "-"))]}))
    print("to stderr", file=sys.stderr)
    end = os.environ.get("END", "")
    sys.exit(int(end) if end.isdigit() else end or None)
""")


def _both(args, cwd, env, timeout=60):
    forked = run_python(args, cwd=cwd, env=env, timeout=timeout)
    fresh = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=timeout, start_new_session=True)
    return forked, fresh


@pytest.fixture
def scripts(tmp_path):
    package = tmp_path / "lib" / "reporter"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(SELF_REPORT)
    (tmp_path / "report.py").write_text(SELF_REPORT)
    (tmp_path / "work").mkdir()
    return tmp_path


@pytest.mark.parametrize("end", ["", "3", "a message"])
def test_a_script_and_a_module_see_what_a_fresh_interpreter_sees_and_end_alike(scripts, end):
    env = {**os.environ, "PYTHONPATH": str(scripts / "lib"), "EXTRA": str(scripts / "lib"), "END": end}
    for args in ([scripts / "report.py", "a", "--b"], ["-m", "reporter", "a", "--b"]):
        forked, fresh = _both(args, scripts / "work", env)
        assert forked.returncode == fresh.returncode == {"": 0, "3": 3, "a message": 1}[end]
        assert forked.stderr == fresh.stderr and forked.stderr.startswith("to stderr\n")
        seen, expected = json.loads(forked.stdout), json.loads(fresh.stdout)
        expected["env"].update(preloaded_environment(env))  # what importing Lightning sets, as in a `metasgd` run
        assert seen == expected, (args, seen, expected)
        assert seen["session_leader"] and seen["stdin"] == "" and seen["extra_path"] == [str(scripts / "lib")]


def test_an_uncaught_exception_prints_its_traceback_and_ends_with_1(tmp_path):
    (tmp_path / "fail.py").write_text("def f():\n    raise ValueError('boom')\nf()\n")
    forked, fresh = _both([tmp_path / "fail.py"], tmp_path, os.environ)
    assert forked.returncode == fresh.returncode == 1
    for proc in (forked, fresh):
        assert proc.stderr.startswith("Traceback") and proc.stderr.endswith("ValueError: boom\n")


def test_a_signal_to_the_runs_group_ends_it_and_spares_the_server(tmp_path):
    (tmp_path / "stop.py").write_text("import os, signal\nprint('up', flush=True)\nos.killpg(0, signal.SIGTERM)\n")
    forked, fresh = _both([tmp_path / "stop.py"], tmp_path, os.environ)
    assert forked.returncode == fresh.returncode == -signal.SIGTERM and forked.stdout == "up\n"
    assert run_python(["-c", "pass"], cwd=tmp_path, env=os.environ, timeout=60).returncode == 0  # fresh (an option)
    assert run_python([tmp_path / "stop.py"], cwd=tmp_path, env=os.environ, timeout=60).stdout == "up\n"  # served


def test_a_run_past_its_timeout_is_killed_with_its_children(tmp_path):
    (tmp_path / "hang.py").write_text(textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
    """))
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        run_python([tmp_path / "hang.py"], cwd=tmp_path, env=os.environ, timeout=3)
    child = int(stopped.value.output)
    deadline = time.monotonic() + 10
    while _running(child):  # SIGKILL is delivered at once, but a process may take a moment to die
        assert time.monotonic() < deadline, f"the run's child {child} outlived the timeout"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_call_waits_for_what_the_run_left_running_as_subprocess_run_does(tmp_path):
    (tmp_path / "leave.py").write_text(textwrap.dedent("""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1); print('late', flush=True)"])
        print('first', flush=True)
    """))
    forked, fresh = _both([tmp_path / "leave.py"], tmp_path, os.environ)
    assert forked.stdout == fresh.stdout == "first\nlate\n"


def test_each_run_draws_its_own_random_numbers(tmp_path):
    (tmp_path / "draw.py").write_text("import random, numpy\nprint(random.random(), numpy.random.rand())\n")
    first, second = (run_python([tmp_path / "draw.py"], cwd=tmp_path, env=os.environ, timeout=60).stdout.split()
                     for _ in range(2))
    assert first[0] != second[0] and first[1] != second[1]


def test_a_missing_working_folder_is_refused_as_subprocess_run_refuses_it(tmp_path):
    (tmp_path / "x.py").write_text("")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        run_python([tmp_path / "x.py"], cwd=tmp_path / "nowhere", env=os.environ, timeout=60)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        subprocess.run([sys.executable, tmp_path / "x.py"], cwd=tmp_path / "nowhere", timeout=60)
