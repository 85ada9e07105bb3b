"""Steppers (a request's KV cache, and on CUDA its captured step) kept for the next request of the same shape:
the tokens are those of a fresh stepper, two requests never share one, and models and memory are let go."""

import gc
import weakref

import torch

from dalle_app.engine import SamplingOptions, generate_image_tokens, generate_in_chunks
from dalle_app.engine.stepper import POOL
from test_engine import CONFIGS, make_dalle, prompts

OPTIONS = SamplingOptions(top_k=10, cond_scale=3.0)


def idle(dalle) -> list:
    return list(POOL._idle.get(dalle, {}).values())


def fresh(dalle, text, **kwargs) -> torch.Tensor:
    POOL.clear()
    return generate_image_tokens(dalle, text, OPTIONS, **kwargs).image_ids


def test_a_kept_stepper_gives_the_tokens_of_a_fresh_one():
    """The second request takes over the first one's stepper (and cache, full of the first request's keys) and
    samples what it would have with a new one: with another prompt and seeds, and with priming."""
    dalle = make_dalle(**CONFIGS["mixed"])
    first_text, second_text = prompts(2), prompts(3)[1:]
    prime = torch.randint(0, 48, (2, 21), generator=torch.Generator().manual_seed(4))
    expected = fresh(dalle, second_text, seeds=[7, 8])
    expected_primed = fresh(dalle, second_text, seeds=[7, 8], prime_ids=prime)

    POOL.clear()
    generate_image_tokens(dalle, first_text, OPTIONS, seeds=[1, 2])
    [kept] = idle(dalle)
    assert torch.equal(generate_image_tokens(dalle, second_text, OPTIONS, seeds=[7, 8]).image_ids, expected)
    assert idle(dalle) == [kept]  # taken and given back, not built again
    got = generate_image_tokens(dalle, second_text, OPTIONS, seeds=[7, 8], prime_ids=prime).image_ids
    assert torch.equal(got, expected_primed)
    assert idle(dalle) == [kept]


def test_a_request_paused_between_tokens_keeps_its_stepper_to_itself():
    """While a request waits between two tokens (the service's scheduler runs another request then), a request of
    the same shape builds its own stepper; both get their own tokens."""
    dalle = make_dalle()
    text_a, text_b = prompts(2), prompts(3)[1:]
    expected_a, expected_b = fresh(dalle, text_a, seeds=[1, 2]), fresh(dalle, text_b, seeds=[3, 4])
    POOL.clear()
    generate_image_tokens(dalle, text_b, OPTIONS, seeds=[9, 9])
    [kept] = idle(dalle)  # one idle stepper of this shape, which the outer request takes
    inner = []

    def pause():
        if not inner:  # at the first pause, another request runs to the end
            inner.append(generate_image_tokens(dalle, text_b, OPTIONS, seeds=[3, 4]).image_ids)
        return False

    got_a = generate_image_tokens(dalle, text_a, OPTIONS, seeds=[1, 2], should_stop=pause).image_ids
    assert torch.equal(got_a, expected_a) and torch.equal(inner[0], expected_b)
    assert idle(dalle) == [kept]  # given back last, it replaced the one the inner request built


def test_steppers_are_kept_per_setting_up_to_the_limit_and_freed_with_their_model():
    dalle = make_dalle()
    POOL.clear()
    for scale in (1.0, 2.0, 3.0):
        generate_image_tokens(dalle, prompts(1), SamplingOptions(cond_scale=scale), seeds=[0])
    kept = idle(dalle)
    assert len(kept) == POOL.keep == 2
    assert [s.guided for s in kept] == [True, True]  # the oldest (no guidance) was dropped
    generate_image_tokens(dalle, prompts(2), SamplingOptions(cond_scale=3.0), seeds=[0, 1])
    assert [s.cache.batch_size for s in idle(dalle)] == [2, 4]  # another batch size is another stepper
    del kept
    cache_ref = weakref.ref(idle(dalle)[0].cache)
    del dalle
    gc.collect()
    assert len(POOL._idle) == 0 and cache_ref() is None


def test_out_of_memory_first_drops_the_kept_steppers_and_retries_the_same_chunk():
    dalle = make_dalle()
    text = prompts(4)
    POOL.clear()
    generate_image_tokens(dalle, text[:1], OPTIONS, seeds=[0])  # something kept
    calls = []

    def once_short_of_memory(model, txt, options, **kw):
        calls.append(txt.shape[0])
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return generate_image_tokens(model, txt, options, **kw)

    result = generate_in_chunks(dalle, text, OPTIONS, seeds=[1, 2, 3, 4], generate=once_short_of_memory)
    assert calls == [4, 4] and result.notes == []
    assert torch.equal(result.image_ids, fresh(dalle, text, seeds=[1, 2, 3, 4]))
