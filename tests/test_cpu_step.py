"""The compiled CPU decoding step (`dalle_app/engine/cpu_step.c`) against the PyTorch step it replaces."""

import pytest
import torch

from dalle_app.engine import SamplingOptions, complete_text, cpu_step, generate_image_tokens, guide
from dalle_app.engine.sampling import sample_plain
from dalle_app.models.token_step import decode_token
from test_engine import CONFIGS, T, make_dalle, prompts

pytestmark = pytest.mark.skipif(cpu_step.library() is None, reason=f"no C step here: {cpu_step.unavailable_reason()}")

SUPPORTED = [name for name in CONFIGS if name != "reversible_sandwich"]


def sparse_dalle(dim_head=16):
    dalle = make_dalle(dim_head, attn_types=("full", "sparse"))
    layout = dalle.transformer.layers[1].attn.module.master_layout
    layout.copy_((torch.rand(layout.shape, generator=torch.Generator().manual_seed(0)) < 0.5).long()
                 | torch.eye(layout.shape[-1], dtype=torch.long))
    return dalle


@pytest.mark.parametrize("dim_head", [16, 32, 64, 12])
@pytest.mark.parametrize("name", [*SUPPORTED, "sandwich", "sparse"])
def test_c_step_equals_the_pytorch_step(name, dim_head):
    """Logits, hidden states and every cache write of the C step equal `decode_token` + `image_logits`, at text,
    first-image, row-start and inner positions, for each attention type, with and without rotary and token shift,
    sandwich norms and shared layers, for head sizes with a vectorised attention (32, 64) and without (16, 12)."""
    if name == "sparse":
        dalle = sparse_dalle(dim_head)
    else:
        dalle = make_dalle(dim_head, **({"sandwich_norm": True} if name == "sandwich" else CONFIGS[name]))
    t = dalle.transformer
    tokens = dalle.embed(prompts(3), torch.randint(0, 48, (3, 30)))
    with torch.no_grad():
        for pos in (4, T + 1, T + 1 + 8, T + 1 + 17, tokens.shape[1] - 1):
            torch_cache, c_cache = dalle.new_cache(3), dalle.new_cache(3)
            for cache in (torch_cache, c_cache):
                t(tokens[:, :pos], cache=cache, start=0)
            assert cpu_step.supports(dalle, c_cache)
            step = cpu_step.CpuStep(dalle, c_cache)
            hidden = decode_token(t, tokens[:, pos], torch_cache, pos)
            expected = dalle.image_logits(hidden)
            got = step(tokens[:, pos], pos)
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (pos, (got - expected).abs().max())
            for a, b in zip(torch_cache.kv + (torch_cache.shifted or []), c_cache.kv + (c_cache.shifted or [])):
                assert torch.allclose(a, b, atol=1e-5)
            again = cpu_step.CpuStep(dalle, dalle.new_cache(3))  # hidden states only (text completion)
            for cache in (again.cache,):
                t(tokens[:, :pos], cache=cache, start=0)
            assert torch.allclose(again(tokens[:, pos], pos, with_logits=False), hidden, atol=1e-5)


def test_an_image_does_not_depend_on_the_rest_of_its_batch():
    """Each row is computed by the same code in the same order whatever the batch: bit for bit equal alone and in a
    batch of three."""
    dalle = make_dalle()
    tokens = dalle.embed(prompts(3), torch.randint(0, 48, (3, 10)))
    with torch.no_grad():
        logits = []
        for rows in (slice(0, 3), slice(1, 2)):
            cache = dalle.new_cache(rows.stop - rows.start)
            dalle.transformer(tokens[rows, :T + 5], cache=cache, start=0)
            step = cpu_step.CpuStep(dalle, cache)
            step(tokens[rows, T + 5], T + 5)
            logits.append(step(tokens[rows, T + 6], T + 6))
    assert torch.equal(logits[0][1], logits[1][0])


def test_engine_results_match_with_and_without_the_c_step(monkeypatch):
    """The engine samples the same tokens and texts through the C step as through the PyTorch step."""
    dalle = make_dalle(**CONFIGS["mixed"])
    options = SamplingOptions(top_k=10, cond_scale=3.0)
    with_c = generate_image_tokens(dalle, prompts(2), options, seeds=[3, 4]).image_ids
    text_c = complete_text(dalle, [[5, 6], [7]], SamplingOptions(top_k=20), seeds=[1, 2]).token_ids
    used = []
    monkeypatch.setattr(cpu_step.CpuStep, "__call__", lambda *a, **kw: used.append(1))
    monkeypatch.setattr(cpu_step, "supports", lambda *a: False)
    without = generate_image_tokens(dalle, prompts(2), options, seeds=[3, 4]).image_ids
    text_torch = complete_text(dalle, [[5, 6], [7]], SamplingOptions(top_k=20), seeds=[1, 2]).token_ids
    assert not used
    assert torch.equal(with_c, without)
    assert torch.equal(text_c, text_torch)


def test_c_sampler_picks_the_tokens_of_the_pytorch_sampler():
    """Guidance, top-k (including ties at the k-th value and no filter), temperature and the seeded Gumbel noise in
    C pick the same token as `sample_plain(guide(...))` for every row."""
    dalle = make_dalle()
    step = cpu_step.CpuStep(dalle, dalle.new_cache(3))
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        logits = torch.randn(6, 1024, generator=g) * 3
        if trial % 4 == 0:
            logits = logits.round()  # many ties
        seeds = torch.randint(0, 2 ** 31 - 1, (3,), generator=g)
        position = int(torch.randint(0, 5000, (1,), generator=g))
        for top_k in (None, 1, 8, 1023):
            for cond_scale in (None, 1.5, 3.0):
                rows = logits if cond_scale is not None else logits[:3]
                guided = guide(rows, cond_scale) if cond_scale is not None else rows
                expected = sample_plain(guided, seeds, position, 0.9, top_k, None)
                got = step.sample(rows, seeds, position, 0.9, top_k, cond_scale)
                assert torch.equal(got, expected), (trial, top_k, cond_scale)


def test_supports_only_what_the_c_step_computes():
    dalle = make_dalle()
    assert cpu_step.supports(dalle, dalle.new_cache(1))
    assert not cpu_step.supports(dalle, dalle.new_cache(1, dtype=torch.float64))
    assert not cpu_step.supports(make_dalle(reversible=True), make_dalle(reversible=True).new_cache(1))
    stable = make_dalle(stable=True)
    assert not cpu_step.supports(stable, stable.new_cache(1))
    assert not cpu_step.supports(dalle.double(), dalle.new_cache(1, dtype=torch.float64))


def test_bad_positions_and_shapes_are_refused_in_words():
    dalle = make_dalle()
    step = cpu_step.CpuStep(dalle, dalle.new_cache(2))
    with pytest.raises(ValueError, match="outside the cache"):
        step(torch.zeros(2, 32), dalle.total_seq_len)
    with pytest.raises(ValueError, match="expected tokens of shape"):
        step(torch.zeros(3, 32), 5)


def test_the_build_is_cached_per_cpu_and_missing_compiler_means_pytorch(tmp_path, monkeypatch):
    """The library is compiled into DALLE_APP_CACHE once; without a compiler the engine says why and samples with
    PyTorch."""
    monkeypatch.setenv("DALLE_APP_CACHE", str(tmp_path))
    cpu_step.library.cache_clear()
    try:
        assert cpu_step.library() is not None
        built = list((tmp_path / "cpu_step").glob("cpu_step_*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_step.library.cache_clear()
        assert cpu_step.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt

        monkeypatch.setenv("DALLE_APP_CACHE", str(tmp_path / "empty"))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        cpu_step.library.cache_clear()
        assert cpu_step.library() is None
        assert "no C compiler" in cpu_step.unavailable_reason()
        dalle = make_dalle()
        assert not cpu_step.supports(dalle, dalle.new_cache(1))
        ids = generate_image_tokens(dalle, prompts(1), SamplingOptions(top_k=5), seeds=[0]).image_ids
        assert ids.shape == (1, dalle.image_seq_len)
    finally:
        cpu_step.library.cache_clear()
