"""Run `app.py` with faults injected from the outside, for the reliability tests (no test hooks in the app itself).

    python tests/reliability_launcher.py --model ... --port ...      (the same flags as app.py)

Environment variables (all optional):
  DALLE_TEST_STEP_DELAY   seconds slept per image per decoding step: makes a tiny model as slow as a large one,
                          without using the CPU (the machine running the tests is small and shared).
  DALLE_TEST_OOM_FILE     a file holding a number N: a decoding step with more than N images raises
                          torch.OutOfMemoryError, as CUDA does when a batch does not fit (absent file = no limit).
  DALLE_TEST_STEP_LOG     a file where the launcher keeps {rows: [steps run, time of the last step]} up to date
                          (every 0.05 s), so a test can see whether a request is still computing.
  DALLE_TEST_NO_HF_BACKOFF=1  huggingface_hub's retries do not sleep (1 s per resumed download otherwise).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_app.engine import stepper as engine_stepper  # noqa: E402

DELAY = float(os.environ.get("DALLE_TEST_STEP_DELAY", "0") or 0)
OOM_FILE = os.environ.get("DALLE_TEST_OOM_FILE")
STEP_LOG = os.environ.get("DALLE_TEST_STEP_LOG")
steps: dict[int, list] = {}
_original_step = engine_stepper.Stepper.__call__


def _step(self, ids, pos):
    rows = int(ids.shape[0])
    if OOM_FILE and os.path.exists(OOM_FILE):
        text = Path(OOM_FILE).read_text().strip()
        if text and rows > int(text):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated by the test)")
    if DELAY:
        time.sleep(DELAY * rows)
    entry = steps.setdefault(rows, [0, 0.0])
    entry[0] += 1
    entry[1] = time.time()
    return _original_step(self, ids, pos)


def _write_log():
    while True:
        tmp = STEP_LOG + ".tmp"
        Path(tmp).write_text(json.dumps({str(k): v for k, v in list(steps.items())}))
        os.replace(tmp, STEP_LOG)
        time.sleep(0.05)


engine_stepper.Stepper.__call__ = _step
if STEP_LOG:
    threading.Thread(target=_write_log, daemon=True).start()
if os.environ.get("DALLE_TEST_NO_HF_BACKOFF"):
    import huggingface_hub.file_download as file_download
    import huggingface_hub.utils._http as hf_http

    class _NoSleep:
        """The time module without sleeping, for huggingface_hub's modules only (not the whole process)."""

        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            pass

    for module in (file_download, hf_http):
        if hasattr(module, "time"):
            module.time = _NoSleep()

os.chdir(ROOT)
sys.argv = [str(ROOT / "app.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
