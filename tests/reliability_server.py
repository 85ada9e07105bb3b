"""Shared fixture pieces for tests that run the app: start `python app.py` with a tiny model on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app_factory import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(root: Path, *extra: str, env: dict | None = None, faults: bool = False,
              program: list[str] | None = None, unset: tuple[str, ...] = ()
              ) -> tuple[subprocess.Popen, str, Path]:
    """Build a tiny model under `root`, start app.py on it; return (process, url, model folder).

    env: extra environment variables; unset: variables removed from the app's environment. faults: start it through
    tests/reliability_launcher.py, which injects the faults its environment variables ask for (slow steps, simulated
    out-of-memory, no Hub retry waits). program: another launcher to run instead of app.py (its arguments first),
    which is given app.py's flags."""
    folder = make_tiny_model(root / "model")
    port = free_port()
    env = dict(os.environ, DALLE_APP_MODEL_DIRS=str(root), DALLE_APP_CATALOG=str(root / "catalog.json"),
               GRADIO_SERVER_NAME="127.0.0.1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    for name in unset:
        env.pop(name, None)
    log = open(root / "app.log", "w")
    program = program or ([str(ROOT / "tests" / "reliability_launcher.py")] if faults else ["app.py"])
    proc = subprocess.Popen([sys.executable, *program, "--model", str(folder), "--port", str(port), "--device",
                             "cpu", "--dtype", "fp32", *extra], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited early: {(root / 'app.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}/", folder
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    pytest.fail("app.py did not answer within 60 s")


def stop_app(proc: subprocess.Popen) -> None:
    """Terminate the app started by `start_app`."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
