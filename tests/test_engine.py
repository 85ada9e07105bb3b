"""Engine correctness: cached decoding equals the uncached forward, guidance, seeds, priming, stop, OOM fallback,
and the DALLE-pytorch generation bugs that this project fixes."""

import shutil

import pytest
import torch

from dalle_app.engine import (SamplingOptions, complete_text, generate_image_tokens, generate_in_chunks, guide,
                              sample)
from dalle_app.models import DALLE, DiscreteVAE

T = 8
CONFIGS = {
    "full": dict(),
    "mixed": dict(attn_types=("full", "axial_row", "axial_col", "conv_like")),
    "conv_centered": dict(attn_types=("conv_like",), conv_like_window="centered"),
    "axial_pos_no_shift": dict(rotary_emb=False, shift_tokens=False),
    "reversible_sandwich": dict(reversible=True, sandwich_norm=True, stable=True),
    "shared": dict(shared_attn_ids=(0, 1, 0, 1), shared_ff_ids=(0, 0, 1, 1), share_input_output_emb=True),
}


def make_dalle(dim_head=16, **kw):
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=32, num_layers=2, num_tokens=48, codebook_dim=16, hidden_dim=8)
    return DALLE(dim=32, vae=vae, num_text_tokens=60, text_seq_len=T, depth=4, heads=2, dim_head=dim_head, **kw).eval()


def prompts(rows=3):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 60, (rows, T), generator=g)
    text[:, 5:] = 0
    return text


def uncached_sample(dalle, text, options, seeds, prime=None):
    """Reference sampler: recompute the whole sequence for every token, same noise and filters."""
    seeds_t = torch.tensor(seeds)
    ids = torch.zeros(text.shape[0], 0, dtype=torch.long) if prime is None else prime.clone()
    k = options.effective_top_k(dalle.num_image_tokens, dalle.total_tokens)
    while ids.shape[1] < dalle.image_seq_len:
        j = ids.shape[1]
        cond = dalle(text, ids)[:, -1, dalle.num_text_tokens:]
        if options.cond_scale != 1:
            null = dalle(torch.zeros_like(text), ids)[:, -1, dalle.num_text_tokens:]
            cond = guide(torch.cat([cond, null]), options.cond_scale)
        nxt = sample(cond, seeds_t, j, options.temperature, k, options.top_p)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_generation_equals_uncached(name):
    dalle = make_dalle(**CONFIGS[name])
    text = prompts()
    options = SamplingOptions(temperature=1.0, top_k=10, cond_scale=3.0)
    cached = generate_image_tokens(dalle, text, options, seeds=[5, 6, 7]).image_ids
    assert torch.equal(cached, uncached_sample(dalle, text, options, [5, 6, 7]))


@pytest.mark.parametrize("name", ["mixed", "full"])
def test_cached_generation_with_priming_equals_uncached(name):
    dalle = make_dalle(**CONFIGS[name])
    text = prompts(2)
    prime = torch.randint(0, 48, (2, 21))
    options = SamplingOptions(top_k=12, cond_scale=2.0)
    cached = generate_image_tokens(dalle, text, options, seeds=[1, 2], prime_ids=prime).image_ids
    assert torch.equal(cached[:, :21], prime)
    assert torch.equal(cached, uncached_sample(dalle, text, options, [1, 2], prime=prime))


def test_dict_cache_logits_equal_uncached_forward_for_every_attention_type():
    dalle = make_dalle(**CONFIGS["mixed"])
    text, ids = prompts(2), torch.randint(0, 48, (2, 16))
    full = dalle(text, ids)
    cache = {}
    pieces = [dalle(text, ids[:, :5], cache=cache)] + [dalle(text, ids[:, :n], cache=cache) for n in range(6, 17)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_seed_gives_same_image_whatever_the_batch():
    dalle = make_dalle(**CONFIGS["mixed"])
    text = prompts(3)
    options = SamplingOptions(top_k=8, cond_scale=3.0)
    batch = generate_image_tokens(dalle, text, options, seeds=[11, 12, 13])
    alone = generate_image_tokens(dalle, text[1:2], options, seeds=[12])
    reordered = generate_image_tokens(dalle, text[[2, 1]], options, seeds=[13, 12])
    assert batch.seeds == [11, 12, 13]
    assert torch.equal(alone.image_ids[0], batch.image_ids[1])
    assert torch.equal(reordered.image_ids[1], batch.image_ids[1])
    other_seed = generate_image_tokens(dalle, text[1:2], options, seeds=[99])
    assert not torch.equal(other_seed.image_ids[0], batch.image_ids[1])


def test_random_seeds_are_reported_and_reproduce():
    dalle = make_dalle()
    first = generate_image_tokens(dalle, prompts(2), SamplingOptions())
    again = generate_image_tokens(dalle, prompts(2), SamplingOptions(), seeds=first.seeds)
    assert torch.equal(first.image_ids, again.image_ids)


def test_guidance_equals_formula_on_separate_passes():
    dalle = make_dalle(**CONFIGS["full"])
    text, ids = prompts(2), torch.randint(0, 48, (2, 7))
    cond = dalle(text, ids)[:, -1]
    null = dalle(torch.zeros_like(text), ids)[:, -1]
    stacked = guide(torch.cat([cond, null]), 4.0)
    assert torch.allclose(stacked, null + (cond - null) * 4.0)
    # and the engine's batched [cond; null] pass gives the same logits as the two separate passes
    batch_text = torch.cat([text, torch.zeros_like(text)])
    cache = dalle.new_cache(4)
    h = dalle.transformer(dalle.embed(batch_text, ids.repeat(2, 1)), cache=cache)
    assert torch.allclose(guide(dalle.image_logits(h[:, -1]), 4.0),
                          (null + (cond - null) * 4.0)[:, dalle.num_text_tokens:], atol=1e-5)


def test_keep_mask_keeps_exactly_the_box():
    dalle = make_dalle(**CONFIGS["mixed"])
    side = dalle.fmap_size
    keep = torch.zeros(side, side, dtype=torch.bool)
    keep[2:5, 1:4] = True
    prime = torch.randint(0, 48, (2, side * side))
    out = generate_image_tokens(dalle, prompts(2), SamplingOptions(top_k=5), seeds=[3, 4], prime_ids=prime,
                                keep_mask=keep.flatten()).image_ids
    assert torch.equal(out[:, keep.flatten()], prime[:, keep.flatten()])
    assert not torch.equal(out[:, ~keep.flatten()], prime[:, ~keep.flatten()])


def test_stop_returns_partial_tokens_and_progress_reports():
    dalle = make_dalle()
    seen = []
    result = generate_image_tokens(dalle, prompts(2), SamplingOptions(), seeds=[1, 2], progress=seen.append,
                                   progress_every=4, should_stop=lambda: len(seen) >= 2)
    assert not result.completed
    assert 8 <= result.image_ids.shape[1] < dalle.image_seq_len
    assert [p.done for p in seen] == [4, 8]
    full = generate_image_tokens(dalle, prompts(2), SamplingOptions(), seeds=[1, 2]).image_ids
    assert torch.equal(full[:, :result.image_ids.shape[1]], result.image_ids)


def test_out_of_memory_is_retried_in_smaller_chunks_with_same_images():
    from dalle_app.engine import stepper

    stepper.POOL.clear()  # steppers kept from other tests would be dropped and the same chunk retried first
    dalle = make_dalle()
    text = prompts(4)
    calls = []

    def flaky(model, txt, options, **kw):
        calls.append(txt.shape[0])
        if txt.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return generate_image_tokens(model, txt, options, **kw)

    result = generate_in_chunks(dalle, text, SamplingOptions(), seeds=[1, 2, 3, 4], generate=flaky)
    assert calls[:2] == [4, 2] and result.notes and "chunks of 1" in result.notes[-1]
    direct = generate_image_tokens(dalle, text, SamplingOptions(), seeds=[1, 2, 3, 4])
    assert torch.equal(result.image_ids, direct.image_ids)


def test_generate_images_leaves_caller_text_alone_and_uses_cache_at_cond_scale_1(monkeypatch):
    dalle = make_dalle(**CONFIGS["full"])
    text = prompts(2)
    before = text.clone()
    lengths = []
    original = dalle.transformer.forward
    monkeypatch.setattr(dalle.transformer, "forward",
                        lambda x, **kw: (lengths.append(x.shape[1]), original(x, **kw))[1])
    images = dalle.generate_images(text, cond_scale=3.0, filter_thres=0.9)
    assert torch.equal(text, before)  # reference bug: zeroed in place with cond_scale != 1
    assert images.shape == (2, 3, 32, 32)
    from dalle_app.engine import cpu_step, stepper as engine_stepper

    monkeypatch.setattr(cpu_step, "supports", lambda *a: False)  # count the PyTorch steps (the C step has its test)
    steps = []
    step = engine_stepper.decode_token
    monkeypatch.setattr(engine_stepper, "decode_token", lambda t, x, *a: (steps.append(x.shape), step(t, x, *a))[1])
    lengths.clear()
    dalle.generate_images(text, cond_scale=1.0)
    # reference bug: cache dropped at cond_scale 1; here one prefill, then one token per step
    assert lengths == [T + 1] and steps == [(2, 32)] * (dalle.image_seq_len - 1)


def test_guidance_uses_its_own_unconditional_history():
    """Reference bug: the unconditional branch reused the conditional cache, so guidance vanished after step 0."""
    dalle = make_dalle(**CONFIGS["full"])
    text = prompts(1)
    a = generate_image_tokens(dalle, text, SamplingOptions(cond_scale=5.0), seeds=[0]).image_ids
    assert torch.equal(a, uncached_sample(dalle, text, SamplingOptions(cond_scale=5.0), [0]))


def test_generate_texts_works_on_cpu_with_tokenizer():
    dalle = make_dalle()

    class Tok:
        def encode(self, s):
            return [ord(c) % 50 + 1 for c in s]

        def decode(self, ids, pad_tokens=()):
            return " ".join(str(i) for i in ids if i and i not in pad_tokens)

    ids, texts = dalle.generate_texts(Tok(), "abc", temperature=1.0)
    assert ids.shape == (1, T) and ids[0, :3].tolist() == Tok().encode("abc")
    assert texts[0].startswith(" ".join(str(i) for i in Tok().encode("abc")))
    a = complete_text(dalle, [[1, 2]], SamplingOptions(), seeds=[4]).token_ids
    b = complete_text(dalle, [[1, 2], [5]], SamplingOptions(), seeds=[4, 9]).token_ids
    assert torch.equal(a[0], b[0])


def test_text_completion_stops_between_tokens_and_keeps_what_it_sampled():
    dalle = make_dalle(**CONFIGS["mixed"])
    seeds, polls = list(range(8)), []
    full = complete_text(dalle, [[1]] * 8, SamplingOptions(), seeds=seeds)
    part = complete_text(dalle, [[1]] * 8, SamplingOptions(), seeds=seeds,
                         should_stop=lambda: polls.append(1) or len(polls) >= 2)
    assert full.completed and not part.completed and len(polls) == 2
    kept = 1 + 2  # the prefix, then one token per poll
    assert torch.equal(part.token_ids[:, :kept], full.token_ids[:, :kept])
    assert (part.token_ids[:, kept:] == 0).all() and (full.token_ids[:, kept:] != 0).any()


def test_bad_sampling_options_raise_clear_errors():
    for bad in (dict(temperature=0), dict(temperature=float("nan")), dict(top_k=0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingOptions(**bad).validate()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_and_generation(dtype):
    dalle = make_dalle(**CONFIGS["mixed"])
    text, ids = prompts(2), torch.randint(0, 48, (2, 16))
    reference = dalle(text, ids)
    half = make_dalle(**CONFIGS["mixed"]).to(dtype)
    logits = half(text, ids)
    assert logits.dtype == dtype
    allowed = ~dalle.logits_mask[0, :logits.shape[1]]
    assert torch.allclose(logits.float()[:, allowed], reference[:, allowed], atol=0.1)
    out = generate_image_tokens(half, text, SamplingOptions(top_k=8, cond_scale=3.0), seeds=[1, 2])
    assert out.image_ids.shape == (2, half.image_seq_len) and int(out.image_ids.max()) < 48


@pytest.mark.parametrize("name", ["mixed", "full", "reversible_sandwich"])
def test_static_cache_step_equals_uncached(name, monkeypatch):
    """The step that CUDA graphs and torch.compile run (position as a tensor, attention over the whole static cache
    with the unwritten tail masked) samples exactly what the uncached forward does."""
    from dalle_app.engine import stepper as engine_stepper

    monkeypatch.setattr(engine_stepper, "_compiled_step", lambda mode=None: engine_stepper.decode_step)
    dalle = make_dalle(**CONFIGS[name])
    text = prompts()
    options = SamplingOptions(temperature=1.0, top_k=10, cond_scale=3.0)
    static = generate_image_tokens(dalle, text, options, seeds=[5, 6, 7], compile_step=True).image_ids
    assert torch.equal(static, uncached_sample(dalle, text, options, [5, 6, 7]))


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on CPU needs a C compiler")
def test_compiled_step_gives_the_same_tokens_in_float32():
    dalle = make_dalle(**CONFIGS["mixed"])
    text = prompts(2)
    options = SamplingOptions(temperature=1.0, top_k=10, cond_scale=3.0)
    eager = generate_image_tokens(dalle, text, options, seeds=[1, 2]).image_ids
    compiled = generate_image_tokens(dalle, text, options, seeds=[1, 2], compile_step=True).image_ids
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("name", [*CONFIGS, "sparse"])
def test_one_token_step_equals_the_general_forward(name):
    """`decode_token` (the eager step) gives the hidden state and the cache writes of `Transformer.forward`, at text
    and image positions, for every attention type, token shift, reversible and shared layers."""
    from dalle_app.models.token_step import decode_token

    kw = dict(attn_types=("full", "sparse")) if name == "sparse" else CONFIGS[name]
    dalle = make_dalle(**kw)
    if name == "sparse":
        layout = dalle.transformer.layers[1].attn.module.master_layout
        layout.copy_((torch.rand(layout.shape, generator=torch.Generator().manual_seed(0)) < 0.5).long()
                     | torch.eye(layout.shape[-1], dtype=torch.long))
    t = dalle.transformer
    tokens = dalle.embed(prompts(2), torch.randint(0, 48, (2, 30)))
    for pos in (4, T + 1, T + 1 + 8, T + 1 + 17, tokens.shape[1] - 1):  # text, first image token, row starts, inside
        general, lean = dalle.new_cache(2), dalle.new_cache(2)
        for cache in (general, lean):
            t(tokens[:, :pos], cache=cache, start=0)
        expected = t(tokens[:, pos:pos + 1], cache=general, start=pos)[:, 0]
        got = decode_token(t, tokens[:, pos], lean, pos)
        assert torch.allclose(got, expected, atol=1e-6), (pos, (got - expected).abs().max())
        for a, b in zip(general.kv + (general.shifted or []), lean.kv + (lean.shifted or [])):
            assert torch.allclose(a, b, atol=1e-6)


def test_results_are_ordinary_tensors_that_callers_may_edit():
    """The engine samples under torch.inference_mode but hands back tensors usable anywhere (in-place edits of
    inference tensors outside that mode raise)."""
    dalle = make_dalle()
    ids = generate_image_tokens(dalle, prompts(1), SamplingOptions(), seeds=[0]).image_ids
    text = complete_text(dalle, [[5, 6]], seeds=[0]).token_ids
    for tensor in (ids, text):
        assert not tensor.is_inference()
        tensor[0, 0] = 1


def test_a_triton_step_that_fails_here_gives_way_to_the_pytorch_step(monkeypatch):
    """A GPU or Triton version that cannot build the Triton step: the request still completes, with the same tokens
    as the PyTorch step, says so in its notes, and later requests no longer try it."""
    from dalle_app.engine import cpu_step, gpu_step

    class Unbuildable:
        def __init__(self, dalle, cache):
            pass

        def __call__(self, x, pos):
            raise RuntimeError("PassManager::run failed\n" + "MLIR dump " * 500)

    dalle = make_dalle()
    options = SamplingOptions(top_k=8, cond_scale=2.0)
    monkeypatch.setattr(cpu_step, "supports", lambda dalle, cache: False)
    expected = generate_image_tokens(dalle, prompts(2), options, seeds=[1, 2], use_cuda_graph=False)
    monkeypatch.setattr(gpu_step, "GpuStep", Unbuildable)
    monkeypatch.setattr(gpu_step, "supports", lambda dalle, cache: gpu_step.ENABLED)
    monkeypatch.setattr(gpu_step, "ENABLED", True)
    monkeypatch.setattr(gpu_step, "disabled_reason", None)
    got = generate_image_tokens(dalle, prompts(2), options, seeds=[1, 2], use_cuda_graph=False)
    assert torch.equal(got.image_ids, expected.image_ids)
    assert got.notes == ["The Triton decoding step failed on this GPU, so the PyTorch step was used "
                         "(RuntimeError: PassManager::run failed)."]
    assert not gpu_step.ENABLED
    assert generate_image_tokens(dalle, prompts(2), options, seeds=[1, 2], use_cuda_graph=False).notes == []
