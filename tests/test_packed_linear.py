"""The CPU fast path of linear layers: same results as F.linear, never a stale packed weight, autograd untouched."""

import pytest
import torch
import torch.nn.functional as F

from dalle_app.models import packed_linear as pl
from dalle_app.models.packed_linear import Linear

pytestmark = pytest.mark.skipif(not pl._available, reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def float32_packed(monkeypatch):
    """The packed path for float32 whatever this CPU's default (packed_dtypes picks by vendor)."""
    monkeypatch.setattr(pl, "_DTYPES", pl._DTYPES | {torch.float32})


def test_the_float32_choice_follows_the_environment_variable(monkeypatch):
    monkeypatch.setenv(pl.CHOICE_ENV, "packed")
    assert torch.float32 in pl.packed_dtypes()
    monkeypatch.setenv(pl.CHOICE_ENV, "plain")
    assert torch.float32 not in pl.packed_dtypes()


def test_packed_linear_matches_f_linear_for_every_batch_shape():
    torch.manual_seed(0)
    layer = Linear(64, 96)
    for shape in [(1, 64), (8, 1, 64), (3, 33, 64)]:
        x = torch.randn(shape)
        with torch.no_grad():
            out = layer(x)
        assert "_packed_weight" in layer.__dict__  # the fast path ran
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_packed_copy_follows_in_place_updates_and_new_weights():
    torch.manual_seed(0)
    layer = Linear(32, 16)
    x = torch.randn(4, 32)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)  # what an optimizer step or load_state_dict does
        after = layer(x)
        torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias), rtol=1e-5, atol=1e-5)
        layer.weight = torch.nn.Parameter(torch.zeros(16, 32))  # a new tensor
        torch.testing.assert_close(layer(x), layer.bias.expand(4, -1))


def test_autograd_and_other_dtypes_use_the_plain_product():
    torch.manual_seed(0)
    layer = Linear(8, 4)
    x = torch.randn(2, 8)
    layer(x).sum().backward()  # training: gradients flow, nothing packed
    assert layer.weight.grad is not None and "_packed_weight" not in layer.__dict__
    with torch.no_grad():
        half = layer.to(torch.float16)(x.half())
    assert half.dtype == torch.float16 and "_packed_weight" not in layer.__dict__


def test_bfloat16_is_packed_where_the_cpu_has_bf16_instructions_and_matches_f_linear():
    torch.manual_seed(0)
    layer = Linear(256, 512).to(torch.bfloat16)
    x = torch.randn(8, 1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    packed = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert out.dtype == torch.bfloat16 and ("_packed_weight" in layer.__dict__) == packed
    # both round to bf16 once at the end, from float32 sums: at most a couple of bf16 steps apart
    torch.testing.assert_close(out.float(), F.linear(x, layer.weight, layer.bias).float(), rtol=0.02, atol=0.02)
