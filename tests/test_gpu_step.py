"""The Triton decoding step (`dalle_app/engine/gpu_step.py`) against the PyTorch step it replaces.

CUDA is not here, so the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set before
Triton is imported, hence the child process), in float32, where the products are exact IEEE float32. On a GPU,
`benchmarks/check_gpu_step.py` compares the engine's tokens and step time with the PyTorch step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch
sys.path.insert(0, "tests")
from test_engine import CONFIGS, T, make_dalle, prompts
from dalle_app.engine import SamplingOptions, generate, generate_image_tokens, gpu_step
from dalle_app.models.token_step import decode_token

torch.set_grad_enabled(False)
# (config, head size, attention splits, reduction block): 3 and 4 splits spread each row's keys over that many
# programs (flash-decoding); 16-channel reduction blocks make every product loop over several weight blocks
CASES = [("full", 16, 1, 1024), ("mixed", 12, 1, 1024), ("conv_centered", 16, 1, 1024),
         ("axial_pos_no_shift", 16, 1, 1024), ("shared", 32, 1, 1024), ("sandwich", 16, 1, 1024),
         ("sparse", 16, 1, 1024), ("mixed", 16, 3, 16), ("sparse", 16, 4, 1024), ("full", 16, 1, 16)]


def model(name, dim_head):
    if name == "sparse":
        dalle = make_dalle(dim_head, attn_types=("full", "sparse"))
        layout = dalle.transformer.layers[1].attn.module.master_layout
        layout.copy_((torch.rand(layout.shape, generator=torch.Generator().manual_seed(0)) < 0.5).long()
                     | torch.eye(layout.shape[-1], dtype=torch.long))
        return dalle
    return make_dalle(dim_head, **({"sandwich_norm": True} if name == "sandwich" else CONFIGS[name]))


steps = []
for name, dim_head, splits, block_k in CASES:
    gpu_step.ATTENTION_SPLITS, gpu_step.BLOCK_K = splits, block_k
    dalle = model(name, dim_head)
    t = dalle.transformer
    tokens = dalle.embed(prompts(3), torch.randint(0, 48, (3, 30), generator=torch.Generator().manual_seed(2)))
    for pos in (4, T + 1 + 5 if name in ("mixed", "sparse") else tokens.shape[1] - 1):
        torch_cache, triton_cache = dalle.new_cache(3), dalle.new_cache(3)
        for cache in (torch_cache, triton_cache):
            t(tokens[:, :pos], cache=cache, start=0)
        x = tokens[:, pos].clone()
        got = gpu_step.GpuStep(dalle, triton_cache)(x, torch.tensor([pos]))
        expected = dalle.image_logits(decode_token(t, tokens[:, pos], torch_cache, pos))
        pairs = list(zip(torch_cache.kv + (torch_cache.shifted or []), triton_cache.kv + (triton_cache.shifted or [])))
        steps.append(dict(case=[name, dim_head, splits, block_k, pos], supported=gpu_step.supports(dalle, triton_cache),
                          logits=(got - expected).abs().max().item(), scale=expected.abs().max().item(),
                          cache=max((a - b).abs().max().item() for a, b in pairs),
                          x_kept=torch.equal(x, tokens[:, pos])))

gpu_step.ATTENTION_SPLITS, gpu_step.BLOCK_K = 1, 1024

# a row alone and in a batch of three
dalle = make_dalle()
tokens = dalle.embed(prompts(3), torch.randint(0, 48, (3, 10)))
alone = []
for rows in (slice(0, 3), slice(1, 2)):
    cache = dalle.new_cache(rows.stop - rows.start)
    dalle.transformer(tokens[rows, :T + 5], cache=cache, start=0)
    alone.append(gpu_step.GpuStep(dalle, cache)(tokens[rows, T + 5], torch.tensor([T + 5])))

# the engine: it picks the GpuStep (here on the CPU under the interpreter, the C step being off) and gives the
# same tokens as the PyTorch step; 4 sampled tokens after 60 kept ones
dalle = make_dalle(**CONFIGS["mixed"])
options = SamplingOptions(top_k=8, cond_scale=3.0)
prime = torch.randint(0, 48, (2, 60), generator=torch.Generator().manual_seed(3))
used = []
original = gpu_step.GpuStep.__call__
def counting(self, x, pos):
    used.append(int(pos))
    return original(self, x, pos)
gpu_step.GpuStep.__call__ = counting
runs = {}
for on in (True, False):
    gpu_step.ENABLED = on
    runs[on] = generate_image_tokens(dalle, prompts(2), options, seeds=[5, 6], prime_ids=prime,
                                     use_cuda_graph=False).image_ids.tolist()
print(json.dumps(dict(steps=steps, alone=torch.equal(alone[0][1], alone[1][0]), on=runs[True], off=runs[False],
                      used=used, first=T + 1 + 60)))
"""


@pytest.fixture(scope="module")
def child_result():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), DALLE_APP_CPU_KERNEL="0",
               DALLE_APP_GPU_STEP="1")
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gpu_step_equals_the_pytorch_step(child_result):
    """Image logits and every cache write (keys, values, token-shift histories) equal `decode_token` +
    `image_logits`, at a text and an image position, for each attention type, with and without rotary and token
    shift, shared layers, sandwich norms and per-head sparse masks, for odd-sized and larger heads, with each row's
    keys in one program or split over 3 and 4 (partial softmax states merged by the output product), and with the
    products' weights in one block or loaded block by block (each next block fetched before the current one is
    used)."""
    assert len(child_result["steps"]) == 20
    for step in child_result["steps"]:
        case = step["case"]
        assert step["supported"], case
        assert step["scale"] > 0.1, case  # logits of a real size, so the bound below means something
        assert step["logits"] < 1e-5, (case, step["logits"])
        assert step["cache"] < 1e-5, (case, step["cache"])
        assert step["x_kept"], case


def test_a_row_does_not_depend_on_the_rest_of_its_batch(child_result):
    assert child_result["alone"]


def test_the_engine_uses_it_and_gives_the_same_tokens(child_result):
    assert child_result["used"] == list(range(child_result["first"], child_result["first"] + 3))
    assert child_result["on"] == child_result["off"]
    assert len(child_result["on"][0]) == 64


def test_supports_only_what_it_computes():
    """CPU tensors outside the interpreter, reversible stacks, `stable` heads, too many rows and a switched-off
    step all fall back to the PyTorch step."""
    from dalle_app.engine import gpu_step
    from test_engine import CONFIGS, make_dalle

    dalle = make_dalle()
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not gpu_step.supports(dalle, dalle.new_cache(2))  # CPU tensors, compiled Triton
    enabled, interpreted = gpu_step.ENABLED, gpu_step._INTERPRETED
    try:
        gpu_step.ENABLED, gpu_step._INTERPRETED = True, True
        assert gpu_step.supports(dalle, dalle.new_cache(2))
        assert not gpu_step.supports(dalle, dalle.new_cache(gpu_step.MAX_ROWS + 1))
        for other in (make_dalle(**CONFIGS["reversible_sandwich"]), make_dalle(stable=True)):
            assert not gpu_step.supports(other, other.new_cache(2))
        half = make_dalle().half()
        assert gpu_step.supports(half, half.new_cache(2))
        assert not gpu_step.supports(half, half.new_cache(2, dtype=torch.float32))  # mixed dtypes
        gpu_step.ENABLED = False
        assert not gpu_step.supports(dalle, dalle.new_cache(2))
    finally:
        gpu_step.ENABLED, gpu_step._INTERPRETED = enabled, interpreted

