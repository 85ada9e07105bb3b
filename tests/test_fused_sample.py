"""The fused top-k sampling kernel picks exactly the tokens of the plain path.

CUDA is not here, so the kernel runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set before
Triton is imported, hence the child process). On a GPU, `benchmarks/check_fused_sample.py` runs the same comparison
on the device and times both.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch
from dalle_app.engine import fused_sample, sampling

torch.manual_seed(0)
results = []
cases = [(16384, 6579, torch.float32), (1024, 64, torch.float32), (1024, 64, torch.bfloat16), (500, 1, torch.float32),
         (300, 299, torch.float32), (8192, 8192, torch.float32)]
for vocab, k, dtype in cases:
    logits = (torch.randn(5, vocab) * 3).to(dtype)
    logits[0, : vocab // 3] = float("-inf")  # masked codes never win
    logits[1, :] = logits[1, :].round()  # many ties at the k-th value
    seeds = torch.randint(0, 2 ** 31 - 1, (5,))
    for position in (1, 200, torch.tensor([77])):
        plain = sampling.sample(logits, seeds, position, 0.7, k)
        fused = fused_sample.sample_top_k(logits, seeds, position, 0.7, k)
        results.append([vocab, k, str(dtype), plain.tolist(), fused.tolist()])
# the noise really comes from the seed: another seed moves tokens
logits = torch.zeros(8, 4096)
a = fused_sample.sample_top_k(logits, torch.arange(8), 3, 1.0, 4096 - 1)
b = fused_sample.sample_top_k(logits, torch.arange(8) + 100, 3, 1.0, 4096 - 1)
# top-k 1 is the argmax whatever the noise
c = torch.randn(4, 2048)
top1 = fused_sample.sample_top_k(c, torch.arange(4), 9, 1.0, 1)
print(json.dumps({"cases": results, "seed_moves": (a != b).sum().item(), "top1": top1.tolist(),
                  "argmax": c.argmax(-1).tolist()}))
"""


@pytest.fixture(scope="module")
def child_result():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fused_kernel_picks_the_plain_paths_tokens(child_result):
    assert len(child_result["cases"]) == 18
    for vocab, k, dtype, plain, fused in child_result["cases"]:
        assert fused == plain, (vocab, k, dtype)


def test_fused_kernel_respects_top_k_one_and_the_seed(child_result):
    assert child_result["top1"] == child_result["argmax"]
    assert child_result["seed_moves"] >= 6  # 8 rows over 4,095 near-uniform codes: a new seed moves nearly all


def test_fused_kernel_only_serves_cuda_tensors():
    import torch

    from dalle_app.engine import fused_sample

    assert not fused_sample.available(torch.zeros(2, 1024))
