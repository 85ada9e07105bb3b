"""The fused decoding-attention kernel equals the PyTorch path: output, cache, and a whole model's tokens.

CUDA is not here, so the kernel runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set before
Triton is imported, hence the child process). On a GPU, `benchmarks/check_decode_kernels.py` compares the engine's
tokens and step time with the kernel on and off.
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
import json, torch
from dalle_app.engine import SamplingOptions, generate_image_tokens, stepper
from dalle_app.models import DALLE, DiscreteVAE, decode_kernels
from dalle_app.models.attention import (Rotary, attend_static_cache, attention_mask, rotary_table, rotary_tables,
                                        sparse_attention_mask, write_kv)

torch.set_grad_enabled(False)
torch.manual_seed(0)
TEXT, FMAP = 17, 12  # 161 positions: two key blocks of 128
L = TEXT + FMAP * FMAP


def reference(qkv, cache, start, mask, rotary, heads, dim_head):
    qkv = qkv.unflatten(-1, (3, heads, dim_head))
    if rotary is not None:
        qkv = rotary.apply(qkv)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    k, v = write_kv(cache, qkv[1:], start)
    return attend_static_cache(qkv[0], k, v, mask).transpose(1, 2).flatten(2)


def compare(b, heads, dim_head, mask_full, pos, rotary_on=True, rows_alone=False):
    tables = rotary_tables(rotary_table(TEXT, FMAP, dim_head)[0], dim_head)
    start = torch.tensor([pos])
    rotary = Rotary(*tables[:, start]) if rotary_on else None
    mask = mask_full[..., start, :]
    mask = mask.unsqueeze(0) if mask.dim() == 2 else mask
    qkv = torch.randn(b, 1, 3 * heads * dim_head)
    cache = torch.randn(2, b, heads, L, dim_head)
    ref_cache, fused_cache = cache.clone(), cache.clone()
    ref = reference(qkv, ref_cache, start, mask, rotary, heads, dim_head)
    cos, sin = (rotary.cos, rotary.sin) if rotary_on else (None, None)
    out = decode_kernels.decode_attention(qkv, fused_cache, start, mask, cos, sin, heads, dim_head)
    others = torch.ones(L, dtype=torch.bool)
    others[pos] = False
    alone = out
    if rows_alone:  # the same rows, one at a time: batch rows are independent
        alone = torch.cat([decode_kernels.decode_attention(qkv[i:i + 1], cache[:, i:i + 1].clone(), start,
                                                           mask[i:i + 1] if mask.dim() == 4 else mask, cos, sin,
                                                           heads, dim_head) for i in range(b)])
    return {"out": (out - ref).abs().max().item(), "cache": (fused_cache - ref_cache).abs().max().item(),
            "untouched": torch.equal(fused_cache[:, :, :, others], cache[:, :, :, others]),
            "written": (fused_cache[:, :, :, pos] - cache[:, :, :, pos]).abs().max().item(),
            "alone": (alone - out).abs().max().item(), "alone_checked": rows_alone, "shape": list(out.shape),
            "finite": bool(out.isfinite().all())}


kernel = []
masks = {kind: attention_mask(kind, TEXT, FMAP, L) for kind in ("full", "axial_row", "conv_like")}
heads = 2
layout = (torch.rand(heads, -(-L // 16), -(-L // 16)) < 0.4).long()
layout[:, :, 0] = 1
layout[:, range(layout.shape[1]), range(layout.shape[1])] = 1
masks["sparse"] = sparse_attention_mask(layout, L)
for dim_head in (32, 64):
    for kind, mask in masks.items():
        # the first image position, one in the second key block, the last
        for pos in (TEXT, TEXT + 120, L - 1) if dim_head == 32 else (TEXT, L - 1):
            kernel.append([dim_head, kind, pos, compare(2, heads, dim_head, mask, pos, rows_alone=pos == L - 1)])
kernel.append([64, "full", 5, compare(2, heads, 64, masks["full"], 5)])  # a text position
kernel.append([64, "no rotary", 100, compare(2, heads, 64, masks["full"], 100, rotary_on=False)])
per_row = torch.stack([masks["full"], masks["axial_row"]])[:, None].expand(2, heads, L, L)  # (b, heads, L, L)
kernel.append([32, "per row", TEXT + 30, compare(2, heads, 32, per_row, TEXT + 30, rows_alone=True)])

# a whole model: the engine's tensor-position step (what the CUDA graph runs), uncompiled, kernel on and off
stepper._compiled_step = lambda mode=None: stepper.decode_step
torch.manual_seed(0)
vae = DiscreteVAE(image_size=32, num_layers=3, num_tokens=48, codebook_dim=16, hidden_dim=8)
dalle = DALLE(dim=32, vae=vae, num_text_tokens=60, text_seq_len=8, depth=4, heads=2, dim_head=32,
              attn_types=("full", "axial_row", "conv_like", "sparse")).eval()
for layer in dalle.transformer.layers:
    if layer.attn.module.kind == "sparse":
        layer.attn.module.master_layout.copy_((torch.rand_like(layer.attn.module.master_layout, dtype=torch.float)
                                               < 0.5).long() | torch.eye(layer.attn.module.master_layout.shape[-1],
                                                                         dtype=torch.long))
text = torch.randint(1, 60, (1, 8))
text[:, 5:] = 0
options = SamplingOptions(temperature=1.0, top_k=10, cond_scale=3.0)
calls = []
real = decode_kernels.decode_attention
decode_kernels.decode_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
on = generate_image_tokens(dalle, text, options, seeds=[3], compile_step=True).image_ids
used = len(calls)
decode_kernels.ENABLED = False
off = generate_image_tokens(dalle, text, options, seeds=[3], compile_step=True).image_ids
decode_kernels.ENABLED = True
plain = generate_image_tokens(dalle, text, options, seeds=[3]).image_ids  # int positions: the kernel never runs

# logits of one step, kernel on and off, from the same cache
text = torch.cat([text, torch.zeros_like(text)])  # a guided batch
cache_a, cache_b = dalle.new_cache(2), dalle.new_cache(2)
tokens = dalle.embed(text, torch.randint(0, 48, (2, 5)))
dalle.transformer(tokens, cache=cache_a, start=0)
dalle.transformer(tokens, cache=cache_b, start=0)
pos = tokens.shape[1]
x = dalle.embed_image(torch.randint(0, 48, (2, 1)), pos - 9)
a = dalle.transformer(x, cache=cache_a, start=torch.tensor([pos]))
decode_kernels.ENABLED = False
b = dalle.transformer(x, cache=cache_b, start=torch.tensor([pos]))
decode_kernels.ENABLED = True
step = {"hidden": (a - b).abs().max().item(),
        "cache": max((ka - kb).abs().max().item() for ka, kb in zip(cache_a.kv, cache_b.kv))}
print(json.dumps({"kernel": kernel, "on": on.tolist(), "off": off.tolist(), "plain": plain.tolist(), "used": used,
                  "tokens": on.shape[1], "step": step, "cpu_available": decode_kernels.available(
                      x, cache_a.kv[0], torch.tensor([pos]), torch.ones(1, 1, cache_a.kv[0].shape[3], dtype=bool))}))
"""


@pytest.fixture(scope="module")
def child_result():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), DALLE_APP_DECODE_KERNELS="1")
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernel_equals_the_pytorch_path(child_result):
    assert len(child_result["kernel"]) == 23
    for dim_head, kind, pos, r in child_result["kernel"]:
        case = (dim_head, kind, pos)
        assert r["finite"], case
        assert r["out"] < 1e-5, case
        assert r["shape"] == [2, 1, 2 * dim_head], case


def test_kernel_writes_only_position_start(child_result):
    for dim_head, kind, pos, r in child_result["kernel"]:
        case = (dim_head, kind, pos)
        assert r["cache"] < 1e-5, case
        assert r["untouched"], case
        assert r["written"] > 0, case


def test_batch_rows_are_independent(child_result):
    checked = [case for case in child_result["kernel"] if case[3]["alone_checked"]]
    assert len(checked) == 9
    for dim_head, kind, pos, r in checked:
        assert r["alone"] == 0, (dim_head, kind, pos)


def test_model_generates_the_same_tokens_with_the_kernel_on_and_off(child_result):
    assert child_result["used"] == 4 * (child_result["tokens"] - 1)  # every layer of every step after the first
    assert child_result["on"] == child_result["off"] == child_result["plain"]
    assert child_result["step"]["hidden"] < 1e-5
    assert child_result["step"]["cache"] < 1e-5


def test_kernel_switch_and_devices():
    import torch

    from dalle_app.models import decode_kernels

    x, cache = torch.zeros(2, 1, 8), torch.zeros(2, 2, 2, 10, 4)
    mask, start = torch.ones(1, 1, 10, dtype=torch.bool), torch.tensor([3])
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not decode_kernels.available(x, cache, start, mask)  # CPU tensors, compiled Triton: never
    enabled = decode_kernels.ENABLED
    try:
        decode_kernels.ENABLED = False
        assert not decode_kernels.available(x, cache, start, mask)
    finally:
        decode_kernels.ENABLED = enabled
    assert not decode_kernels.available(x, cache, 3, mask)  # an int position: the eager path
