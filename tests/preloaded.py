"""`python <script> ...` for the tests, ~10 s faster a run: forked from a server that has imported torch & co. once.

Importing torch, torchvision and Lightning takes ~10 s of a 2-core machine's time, and the end-to-end tests start
train.py, eval.py, predict.py and export.py some twenty times. `run_python(args, cwd)` behaves as
`subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)`: the run is a process of its
own (a fork of the server, made before any torch operation ran, so no thread pool is copied half-alive), with its
own working directory, environment, argv, stdout/stderr, exit code and signals (a run that kills itself with
SIGKILL returns -9), and it ends as Python's exit does (non-daemon threads joined, atexit handlers run, buffers
flushed), less the teardown of every module and object (2.7 s once torch and Lightning are imported). What it cannot
share is what changed the server's imported modules at import time; the server imports only library and project
modules, never runs a test. A child process a run starts itself (DDP's second rank) is a plain new interpreter.

Server protocol (one JSON line each way): request {args, cwd, env, stdout, stderr} -> {"pid"} at once, then
{"status"} when the run ends (os.waitpid's status).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "torchvision", "lightning", "hydra", "omegaconf", "train")


class _Server:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.lock = threading.Lock()
        self._buffer = b""  # our own: a buffered reader may hold a reply that select() then never sees arrive

    def run(self, request: dict, timeout: float | None) -> int:
        """os.waitpid's status of the run; TimeoutError (the run killed) after ``timeout`` seconds."""
        with self.lock:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            pid = self._reply(None)["pid"]
            try:
                return self._reply(timeout)["status"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._reply(None)
                raise

    def _reply(self, timeout: float | None) -> dict:
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the preloaded test server exited (code {self.process.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


_server: _Server | None = None


def start() -> None:
    """Start the server now (its imports then overlap whatever runs next); run_python starts it if needed."""
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _Server()
        atexit.register(_server.close)


def run_python(
    args: list[str], cwd: str | Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python *args` (a script path, `-c CODE` or `-m MODULE`, then its arguments) in ``cwd``, its output
    captured as text; raises subprocess.TimeoutExpired (the run killed) after ``timeout`` seconds."""
    start()
    out_dir = Path(tempfile.mkdtemp(prefix="preloaded-"))
    out, err = out_dir / "stdout", out_dir / "stderr"
    request = {"args": [str(a) for a in args], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
    try:
        status = _server.run(request, timeout)
    except TimeoutError:
        raise subprocess.TimeoutExpired(args, timeout) from None
    stdout, stderr = (p.read_text(errors="replace") for p in (out, err))
    shutil.rmtree(out_dir)
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), stdout, stderr)


# --- the server ----------------------------------------------------------------------------------------------------
def _run_in_child(request: dict) -> int:
    """In the forked child: become `python *args` in its folder, with its environment and output files."""
    import runpy
    import traceback

    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(request["cwd"])
    if request["env"] is not None:
        os.environ.clear()
        os.environ.update(request["env"])
    args = request["args"]
    try:
        if args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path.insert(0, "")
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        elif args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            sys.path.insert(0, str(Path(args[0]).resolve().parent))
            runpy.run_path(args[0], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001  (as the interpreter does: traceback on stderr, exit code 1)
        traceback.print_exc()
        return 1


def _serve() -> None:
    """Read requests until stdin closes, each run in a forked child that ends with os._exit."""
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # the server's own prints must not reach the reply pipe
    os.close(null)
    import importlib

    sys.path.insert(0, str(ROOT))
    for name in PRELOAD:
        importlib.import_module(name)
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            code = _run_in_child(request)
            # what the interpreter's exit does that a run can observe: non-daemon threads joined, atexit handlers
            # run, buffers flushed; not the teardown of every module and object (2.7 s after torch and Lightning)
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": status}) + "\n")


if __name__ == "__main__":
    _serve()
