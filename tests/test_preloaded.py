"""The tests' preloaded runner behaves as `python ...` in a fresh process would (tests/preloaded.py)."""

import os
import subprocess

import pytest

from .preloaded import run_python


def test_a_run_has_its_own_folder_arguments_environment_output_and_exit_code(tmp_path):
    code = (
        "import os, sys; print(os.getcwd()); print(sys.argv[1:]); print(os.environ.get('PRELOADED_PROBE')); "
        "sys.stderr.write('to stderr'); sys.exit(3)"
    )
    done = run_python(["-c", code, "a", "b c"], tmp_path, env={**os.environ, "PRELOADED_PROBE": "1"})
    assert done.returncode == 3 and done.stderr == "to stderr"
    assert done.stdout.splitlines() == [str(tmp_path), "['a', 'b c']", "1"]
    assert "PRELOADED_PROBE" not in os.environ


def test_runs_share_nothing_and_end_as_python_ends(tmp_path):
    assert run_python(["-c", "import json; json.changed_by_a_run = 1"], tmp_path).returncode == 0
    assert run_python(["-c", "import json; print(hasattr(json, 'changed_by_a_run'))"], tmp_path).stdout == "False\n"
    done = run_python(
        [
            "-c",
            "import atexit, threading, time; atexit.register(print, 'atexit ran'); "
            "threading.Thread(target=lambda: (time.sleep(0.2), print('thread joined'))).start()",
        ],
        tmp_path,
    )
    assert done.stdout.splitlines() == ["thread joined", "atexit ran"]
    failed = run_python(["-c", "raise KeyError('missing')"], tmp_path)
    assert failed.returncode == 1 and "KeyError: 'missing'" in failed.stderr


def test_signals_and_timeouts_end_only_the_run(tmp_path):
    killed = run_python(
        ["-c", "import os, signal; print('before', flush=True); os.kill(os.getpid(), signal.SIGKILL)"], tmp_path
    )
    assert killed.returncode == -9 and killed.stdout == "before\n"
    with pytest.raises(subprocess.TimeoutExpired):
        run_python(["-c", "import time; time.sleep(60)"], tmp_path, timeout=1)
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(__name__, sys.argv[0].endswith('script.py'))\n")
    assert run_python([script], tmp_path).stdout == "__main__ True\n"
