"""`python app.py` as a command: --help names every flag and environment variable; bad numbers, on the command line
or in the environment, and a port that is taken end it with one sentence on stderr, never a traceback."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _app(*args, env=None, timeout=60):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_SERVER", "DALLE_APP_"))}
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, env={**environment, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_flags_and_the_environment_variables():
    out = _app("--help")
    assert out.returncode == 0 and out.stderr == ""
    for flag in ("--model", "--device", "--dtype", "--host", "--port", "--queue-size", "--concurrency",
                 "--max-active", "--cache-minutes", "--compile"):
        assert flag in out.stdout
    text = " ".join(out.stdout.split())  # argparse wraps the help text
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "DALLE_APP_MODEL", "DALLE_APP_DEVICE", "DALLE_APP_DTYPE",
                 "DALLE_APP_QUEUE_SIZE", "DALLE_APP_CONCURRENCY", "DALLE_APP_MAX_ACTIVE", "DALLE_APP_COMPILE",
                 "DALLE_APP_CACHE_MINUTES",
                 "HF_HUB_OFFLINE", "DALLE_APP_MODEL_DIRS"):
        assert name in text, name


@pytest.mark.parametrize("name, value, expected", [
    ("GRADIO_SERVER_PORT", "abc", "GRADIO_SERVER_PORT must be a whole number from 1 to 65535, got 'abc'."),
    ("GRADIO_SERVER_PORT", "70000", "GRADIO_SERVER_PORT must be a whole number from 1 to 65535, got '70000'."),
    ("DALLE_APP_QUEUE_SIZE", "-3", "DALLE_APP_QUEUE_SIZE must be a whole number of at least 1, got '-3'."),
    ("DALLE_APP_CONCURRENCY", "1.5", "DALLE_APP_CONCURRENCY must be a whole number of at least 1, got '1.5'."),
    ("DALLE_APP_MAX_ACTIVE", "many", "DALLE_APP_MAX_ACTIVE must be a whole number of at least 0, got 'many'."),
    ("DALLE_APP_CACHE_MINUTES", "0", "DALLE_APP_CACHE_MINUTES must be a whole number of at least 1, got '0'."),
])
def test_a_bad_number_in_the_environment_is_one_sentence_and_exit_status_2(name, value, expected):
    out = _app(env={name: value})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"app.py: error: {expected}\n"  # one line, no traceback


def test_a_bad_flag_value_is_argparse_usage_and_exit_status_2():
    out = _app("--port", "abc")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == "app.py: error: argument --port: expected a whole number from 1 to 65535, " \
                                          "got 'abc'"


def test_a_flag_wins_over_a_bad_environment_variable_and_a_taken_port_is_one_sentence(tmp_path):
    """--port given: GRADIO_SERVER_PORT is not read at all. The port is taken: one sentence, exit status 1."""
    from app_factory import make_tiny_model

    model = make_tiny_model(tmp_path / "model", with_clip=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _app("--model", str(model), "--device", "cpu", "--port", str(port),
                   env={"GRADIO_SERVER_PORT": "abc", "DALLE_APP_MODEL_DIRS": str(tmp_path), "OMP_NUM_THREADS": "1",
                        "DALLE_APP_CATALOG": str(tmp_path / "catalog.json")}, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"error: port {port} on 127.0.0.1 is in use; choose another with --port or GRADIO_SERVER_PORT.", \
        out.stderr[-2000:]


def test_cache_minutes_come_from_the_flag_or_the_environment(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from app import parse_args

    # parse_args writes Gradio's two variables: setenv first, so that monkeypatch puts back what was there
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7860")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
    monkeypatch.delenv("DALLE_APP_CACHE_MINUTES", raising=False)
    assert parse_args([]).cache_minutes == 60
    monkeypatch.setenv("DALLE_APP_CACHE_MINUTES", "7")
    assert parse_args([]).cache_minutes == 7 and parse_args(["--cache-minutes", "5"]).cache_minutes == 5
