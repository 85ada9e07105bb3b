"""Unit tests of dalle_app.service on a tiny random model (seconds on CPU)."""

import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("youtokentome")

from dalle_app.manager import ModelManager
from dalle_app.service import OutOfMemory, RequestError, Service, read_parameters, validate_sampling
from dalle_app.service.turns import Cancelled, Scheduler

from app_factory import make_tiny_model


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    folder = make_tiny_model(root / "model")
    manager = ModelManager(device="cpu", dtype="fp32", allowed_roots=[Path(root)])
    return Service(str(folder), manager=manager, output_dir=root / "out")


def _last(updates):
    return list(updates)[-1]


def test_text_to_image_writes_pngs_with_parameters_and_consecutive_seeds(service):
    updates = [u for u in service.text_to_image("a red circle", num_images=3, temperature=0.8, top_k=10, seed=7)
               if not u.waiting]
    previews, last = updates[:-1], updates[-1]
    assert last.done and last.info["seeds"] == [7, 8, 9] and len(last.files) == 3
    # progress updates carry the three previews, or none when the preview throttle skipped that one
    assert previews and all(not u.done and len(u.images) in (0, 3) for u in previews)
    assert len(previews[0].images) == 3
    assert "tokens/s" in previews[0].progress_text and previews[0].tokens_per_s > 0
    assert all(0 < u.fraction <= 1 and u.eta_s is not None and u.eta_s >= 0 for u in previews)
    assert [u.fraction for u in previews] == sorted(u.fraction for u in previews)
    params = read_parameters(last.files[1])
    assert params["prompt"] == "a red circle" and params["seed"] == 8
    assert params["settings"]["temperature"] == 0.8 and params["settings"]["top_k"] == 10
    assert Image.open(last.files[0]).size == (service.model.image_size,) * 2


def test_same_seed_same_image_and_random_seed(service):
    a = _last(service.text_to_image("a blue square", 2, seed=3))
    b = _last(service.text_to_image("a blue square", 1, seed=4))
    assert list(Image.open(a.files[1]).getdata()) == list(Image.open(b.files[0]).getdata())
    r = _last(service.text_to_image("a blue square", 2, seed=-1))
    assert r.info["seeds"][1] == r.info["seeds"][0] + 1 and r.info["seeds"][0] >= 0


def test_preview_blanks_rows_not_yet_sampled(service):
    side, size = service.model.image_fmap_size, service.model.image_size
    pictures = service._preview(torch.zeros(1, side * 2, dtype=torch.long))
    pixels = torch.tensor(list(pictures[0].getdata())).reshape(size, size, 3)
    assert (pixels[size * 2 // side:] == round(0.9 * 255)).all()


def test_preview_decodes_only_the_finished_rows(service, monkeypatch):
    side = service.model.image_fmap_size
    seen = []
    decode = service._decode
    monkeypatch.setattr(service, "_decode", lambda m, ids: seen.append(tuple(ids.shape)) or decode(m, ids))
    service._preview(torch.zeros(2, side * 3 + 1, dtype=torch.long))
    service._preview(torch.zeros(2, side - 1, dtype=torch.long))  # no finished row: nothing to decode
    assert seen == [(2, 3, side)]


def test_preview_throttle_keeps_previews_to_their_share_of_the_time():
    from dalle_app.service.previews import PreviewThrottle

    throttle = PreviewThrottle(share=0.25)
    assert throttle.due(0.1)
    throttle.spent(0.2)  # that preview cost 0.2 s: the next is due 0.8 s after it began
    assert not throttle.due(0.5) and not throttle.due(0.89)
    assert throttle.due(0.95)
    throttle.spent(0.01)  # cheap previews come often
    assert throttle.due(1.0)
    assert throttle.due(0.05)  # the clock restarted (a retry in smaller chunks): due at once


def test_stop_returns_partial_images(service):
    last = _last(service.text_to_image("a red circle", 2, seed=0, should_stop=lambda: True))
    assert last.info["completed"] is False and len(last.files) == 2
    assert any("Stopped" in n for n in last.info["notes"])


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt=""), "prompt is empty"), (dict(num_images=0), "Number of images"),
    (dict(temperature=0), "Temperature"), (dict(top_k=-1), "Top-k"), (dict(seed=1.5), "whole number"),
    (dict(cond_scale="x"), "Guidance scale"), (dict(num_images=99), "between"),
])
def test_bad_requests_are_one_sentence(service, kwargs, words):
    args = dict(prompt="a red circle", num_images=1, temperature=1.0, top_k=5, cond_scale=1.0, seed=0) | kwargs
    with pytest.raises(RequestError, match=words) as info:
        list(service.text_to_image(**args))
    assert str(info.value).count(". ") == 0 and "\n" not in str(info.value)


def test_long_prompt_is_truncated_with_a_note(service):
    last = _last(service.text_to_image("a red circle on a blue background " * 10, 1, seed=0))
    assert any("cut to the model's" in n for n in last.info["notes"])


def test_rerank_keeps_best_by_clip(service):
    last = _last(service.text_to_image("a red circle", 4, seed=0, rerank_keep=2))
    scores = last.info["clip_scores"]
    assert len(last.files) == 2 and scores == sorted(scores, reverse=True)
    with pytest.raises(RequestError, match="Keep-best"):
        list(service.text_to_image("a red circle", 2, seed=0, rerank_keep=3))


def test_prime_keeps_top_rows_and_box(service, tmp_path):
    source = _last(service.text_to_image("a red circle", 1, seed=0)).files[0]
    updates = [u for u in service.prime_image(source, "a red circle", keep_rows=3, num_images=2, seed=0,
                                              box=(0.5, 0.5, 1, 1)) if not u.waiting]
    assert updates[0].progress_text == "kept part" and updates[-1].info["seeds"] == [0, 1]
    side = service.model.image_fmap_size
    mask = service.keep_mask(3, (0.5, 0.5, 1, 1)).reshape(side, side)
    assert mask[:3].all() and mask[side // 2:, side // 2:].all() and not mask[side - 1, 0]
    with pytest.raises(RequestError, match="Rows to keep"):
        list(service.prime_image(source, "x", keep_rows=side + 1))
    with pytest.raises(RequestError, match="No image"):
        list(service.prime_image(None, "x"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(RequestError, match="could not be read"):
        list(service.prime_image(str(bad), "x"))


def test_reconstruct_reports_psnr_and_usage(service):
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    last = _last(service.reconstruct(image))
    assert len(last.images) == 3 and all(i.size == (service.model.image_size,) * 2 for i in last.images)
    assert 0 < last.info["codebook_used"] <= last.info["codebook_size"] and last.info["psnr_db"] > 0
    assert read_parameters(last.files[2])["settings"]["part"][2] == "token_grid"


def test_complete_text_keeps_prefix_and_seeds(service):
    last = _last(service.complete_text("a red", 3, seed=5))
    assert last.info["seeds"] == [5, 6, 7] and all(t.startswith("a red") for t in last.texts)
    assert _last(service.complete_text("a red", 1, seed=6)).texts[0] == last.texts[1]


def test_a_stopped_text_completion_ends_with_what_it_has(service):
    full = _last(service.complete_text("a", 2, seed=3))
    stopped = _last(service.complete_text("a", 2, seed=3, should_stop=lambda: True))  # stops after one token
    assert full.info["completed"] is True and stopped.info["completed"] is False
    assert stopped.progress_text == "stopped" and stopped.info["seeds"] == [3, 4]
    for short, whole in zip(stopped.texts, full.texts):
        assert short.startswith("a") and whole.startswith(short.rstrip()) and len(short) <= len(whole)


def test_read_parameters_refuses_plain_png(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(RequestError, match="no generation parameters"):
        read_parameters(path)


def test_validate_sampling_top_k_zero_means_all():
    count, options, seed = validate_sampling(2, 1.0, 0, 3.0, 5)
    assert count == 2 and options.top_k is None and options.cond_scale == 3.0 and seed == 5


def test_top_p_is_validated_used_and_saved(service):
    for bad in (0, -0.1, 1.5, "x", float("nan")):
        with pytest.raises(RequestError, match="Top-p"):
            next(service.text_to_image("a red circle", 1, seed=0, top_p=bad))
    assert validate_sampling(1, 1.0, 0, 1.0, 0, top_p=1)[1].top_p is None  # 1 = off
    assert validate_sampling(1, 1.0, 0, 1.0, 0, top_p=None)[1].top_p is None
    nucleus = _last(service.text_to_image("a red circle", 2, top_k=0, seed=11, top_p=1e-6))
    assert read_parameters(nucleus.files[0])["settings"]["top_p"] == 1e-6
    greedy = _last(service.text_to_image("a red circle", 2, top_k=1, seed=12))
    # a tiny top_p keeps only the most likely code at every step: the same as top_k=1 whatever the seed
    assert list(Image.open(nucleus.files[0]).getdata()) == list(Image.open(greedy.files[0]).getdata())
    assert _last(service.complete_text("a red", 1, seed=0, top_p=0.5)).info["top_p"] == 0.5


def test_reconstruction_files_are_named_by_part(service):
    last = _last(service.reconstruct(Image.new("RGB", (32, 32), (0, 90, 200))))
    names = [Path(f).name for f in last.files]
    assert [n.rsplit("-", 1)[1] for n in names] == ["input.png", "reconstruction.png", "token_grid.png"]
    assert not any("None" in n for n in names)


def test_each_request_chooses_its_model_without_changing_the_default(service, tmp_path_factory):
    root = Path(service.manager.allowed_roots[0])
    other = make_tiny_model(root / "other", seed=1)
    default = service.default_reference
    card = service.load(str(other))
    assert card["reference"] and service.default_reference == default and service.model.reference != card["reference"]
    loads = service.manager.loads
    mine = _last(service.text_to_image("a red circle", 1, seed=3, model=str(other)))
    theirs = _last(service.text_to_image("a red circle", 1, seed=3))
    assert service.manager.loads == loads  # served from the manager's cache
    assert read_parameters(mine.files[0])["model"] == card["reference"] == mine.info["model"]
    assert read_parameters(theirs.files[0])["model"] == service.model.reference
    assert list(Image.open(mine.files[0]).getdata()) != list(Image.open(theirs.files[0]).getdata())
    assert _last(service.reconstruct(Image.new("RGB", (8, 8)), model=str(other))).info["model"] == card["reference"]
    assert _last(service.complete_text("a red", 1, seed=0, model=str(other))).info["model"] == card["reference"]


# ----------------------------------------------------------------------------------------------- scheduling

@pytest.fixture
def slow_steps(monkeypatch):
    """Each decoding step sleeps 1 ms per image (a tiny model made as slow as a real one, without using the CPU)."""
    from dalle_app.engine import stepper as engine_stepper

    original = engine_stepper.Stepper.__call__
    rows = []

    def step(self, ids, pos):
        rows.append(ids.shape[0])
        time.sleep(0.001 * ids.shape[0])
        return original(self, ids, pos)

    monkeypatch.setattr(engine_stepper.Stepper, "__call__", step)
    return rows  # images in each step, in the order the steps ran


def _pixels(update):
    return [list(Image.open(f).getdata()) for f in update.files]


def test_scheduler_takes_turns_round_robin_and_bounds_started_requests():
    scheduler = Scheduler(workers=1, max_active=2, slice_s=0.0)
    order, lock = [], threading.Lock()

    def request(name, steps):
        with scheduler.ticket() as ticket:
            for _ in range(steps):
                with lock:
                    order.append(name)
                time.sleep(0.002)
                ticket.pause_point()

    threads = [threading.Thread(target=request, args=(name, 20)) for name in "abc"]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(10)
    assert sorted(order) == ["a"] * 20 + ["b"] * 20 + ["c"] * 20
    # once b has arrived, a and b alternate step by step (slice_s=0) until one of them is done
    first_b, first_c = order.index("b"), order.index("c")
    last = {name: max(i for i, n in enumerate(order) if n == name) for name in "ab"}
    both = order[first_b - 1:min(last.values()) + 1]
    assert len(both) > 10 and all(x != y for x, y in zip(both, both[1:])), order
    # c (third, with max_active=2) starts only once a or b has finished
    assert first_c > min(last.values()), order
    assert scheduler.stats() == {"running": 0, "started": 0, "waiting": 0}


def test_a_cancelled_ticket_leaves_the_queue():
    scheduler = Scheduler(workers=1)
    first = scheduler.ticket()
    first.__enter__()
    waiting = scheduler.ticket()
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(Cancelled, waiting.__enter__)))
    t.start()
    time.sleep(0.05)
    assert waiting.position() == 1  # the one computing
    waiting.cancel()
    t.join(2)
    assert not t.is_alive() and errors and scheduler.stats()["waiting"] == 0
    first.__exit__(None, None, None)
    assert scheduler.stats() == {"running": 0, "started": 0, "waiting": 0}


def test_small_request_is_not_starved_by_a_large_one_and_results_do_not_change(service, slow_steps):
    fair = Service(service.default_reference, manager=service.manager, output_dir=service.output_dir, slice_s=0.02)
    big_alone = _last(fair.text_to_image("a blue square", 16, seed=100))
    small_alone = _last(fair.text_to_image("a red circle", 1, seed=7))
    done = {}

    def run(name, n, seed, prompt):
        start = time.perf_counter()
        last = _last(fair.text_to_image(prompt, n, seed=seed))
        done[name] = (last, time.perf_counter() - start, time.perf_counter())

    big = threading.Thread(target=run, args=("big", 16, 100, "a blue square"))
    big.start()
    time.sleep(0.1)  # the big request is computing
    run("small", 1, 7, "a red circle")
    big.join(30)
    (big_last, big_s, big_end), (small_last, small_s, small_end) = done["big"], done["small"]
    print(f"\n[fairness] big 16 images {big_s:.2f} s; small 1 image submitted 0.1 s later: {small_s:.2f} s "
          f"(alone {small_alone.info['seconds']:.2f} s)")
    # Served first-come-first-served, the small request would finish after the big one and take longer than it
    # (it would wait for all of it); sharing the worker turn by turn it took 0.38-0.50 of the big one's time
    # (2.3-3.1x its time alone, depending on the machine).
    assert small_end < big_end and small_s < 0.75 * big_s
    assert _pixels(big_last) == _pixels(big_alone) and _pixels(small_last) == _pixels(small_alone)
    assert big_last.info["seeds"] == list(range(100, 116)) and small_last.info["seeds"] == [7]


def test_closing_a_request_frees_its_turn_at_once(service, slow_steps):
    fair = Service(service.default_reference, manager=service.manager, output_dir=service.output_dir)
    updates = fair.text_to_image("a blue square", 16, seed=0)
    first = next(u for u in updates if u.images)  # computing
    assert not first.done and fair.scheduler.stats()["started"] == 1
    start = time.perf_counter()
    updates.close()  # what Gradio does when the client goes away
    while fair.scheduler.stats()["started"] and time.perf_counter() - start < 5:
        time.sleep(0.005)
    freed = time.perf_counter() - start
    assert fair.scheduler.stats() == {"running": 0, "started": 0, "waiting": 0} and freed < 0.5, freed


def test_out_of_memory_is_retried_in_smaller_chunks_with_the_same_images(service, monkeypatch):
    from dalle_app.engine import stepper as engine_stepper

    whole = _last(service.text_to_image("a red circle", 4, seed=21))
    original = engine_stepper.Stepper.__call__
    limit = {"rows": 2}

    def step(self, ids, pos):
        if ids.shape[0] > limit["rows"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, ids, pos)

    monkeypatch.setattr(engine_stepper.Stepper, "__call__", step)
    updates = list(service.text_to_image("a red circle", 4, seed=21))
    split = updates[-1]
    assert any("chunks of 2" in n for n in split.info["notes"]) and split.info["seeds"] == [21, 22, 23, 24]
    assert _pixels(split) == _pixels(whole)
    assert all(len(u.images) == 4 for u in updates if u.images)  # previews always show every image
    limit["rows"] = 0
    with pytest.raises(OutOfMemory, match="even for one image") as info:
        list(service.text_to_image("a red circle", 2, seed=0))
    assert "\n" not in str(info.value)


def test_concurrent_requests_with_different_models_never_mix(service):
    other = str(make_tiny_model(Path(service.manager.allowed_roots[0]) / "third", seed=2))
    fair = Service(service.default_reference, manager=service.manager, output_dir=service.output_dir, slice_s=0.005)
    jobs = [(f"a red circle {i}" if i % 2 else f"a blue square {i}", other if i % 3 == 0 else None, 1 + i % 3,
             50 * i) for i in range(8)]
    results, errors = {}, []

    def run(i, prompt, model, count, seed):
        try:
            results[i] = _last(fair.text_to_image(prompt, count, seed=seed, top_k=8, model=model))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == len(jobs)
    for i, (prompt, model, count, seed) in enumerate(jobs):
        expected_model = fair.get_model(model).reference
        assert results[i].info["seeds"] == [seed + j for j in range(count)]
        for j, path in enumerate(results[i].files):
            params = read_parameters(path)
            assert (params["prompt"], params["seed"], params["model"]) == (prompt, seed + j, expected_model)
        alone = _last(service.text_to_image(prompt, count, seed=seed, top_k=8, model=model))
        assert _pixels(results[i]) == _pixels(alone)
    assert len({f for r in results.values() for f in r.files}) == sum(j[2] for j in jobs)  # no file overwritten


def test_a_request_waiting_for_its_turn_gets_keep_alives_with_its_place(service, slow_steps):
    fair = Service(service.default_reference, manager=service.manager, output_dir=service.output_dir, max_active=1,
                   heartbeat_s=0.05)
    big = threading.Thread(target=lambda: _last(fair.text_to_image("a blue square", 16, seed=0)))
    big.start()
    while not fair.scheduler.stats()["running"]:
        time.sleep(0.005)
    updates = list(fair.text_to_image("a red circle", 1, seed=1))
    big.join(30)
    waits = [u for u in updates if u.waiting]
    assert waits and all(not u.images and not u.done for u in waits)
    assert "1 request ahead" in waits[0].progress_text
    assert updates[-1].done and updates[-1].info["seeds"] == [1]
    # max_active=1: the small request starts only once the big one has finished
    assert slow_steps.index(1) > max(i for i, n in enumerate(slow_steps) if n == 16)


def test_in_fresh_thread_returns_result_reraises_and_runs_elsewhere():
    from dalle_app.service.turns import in_fresh_thread

    assert in_fresh_thread(lambda a, b=0: a + b, 2, b=3) == 5
    assert in_fresh_thread(threading.get_ident) != threading.get_ident()
    with pytest.raises(ValueError, match="boom"):
        in_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))



def test_a_stop_while_waiting_for_a_turn_ends_the_request_without_computing(service, slow_steps):
    from dalle_app.service import NOT_STARTED

    fair = Service(service.default_reference, manager=service.manager, output_dir=service.output_dir,
                   max_active=1, heartbeat_s=0.05)
    big = fair.text_to_image("a blue square", 16, seed=0)
    next(u for u in big if u.images)  # computing, in the only place
    stop = threading.Event()
    small = fair.text_to_image("a red circle", 3, seed=5, should_stop=stop.is_set)
    assert next(small).waiting  # behind the big one
    stop.set()
    start = time.perf_counter()
    rest = list(small)
    assert time.perf_counter() - start < 0.5 and len(rest) == 1
    assert rest[0].done and not rest[0].files and rest[0].progress_text == NOT_STARTED
    assert rest[0].info["completed"] is False
    big.close()
    while fair.scheduler.stats()["started"]:
        time.sleep(0.01)
    assert 3 not in slow_steps  # the stopped request never ran a step
    assert _last(fair.text_to_image("a red circle", 3, seed=5)).info["seeds"] == [5, 6, 7]  # the next one works


def test_a_priming_png_restores_the_priming_controls(service):
    """"Read parameters" on a priming PNG fills the priming tab (rows, box, sampling, seed, the image itself) and
    switches to it; a text-to-image PNG fills the text-to-image controls and leaves the priming ones alone."""
    import gradio as gr

    from dalle_app.ui import Handlers

    source = _last(service.text_to_image("a red circle", 1, seed=0, cond_scale=2.0)).files[0]
    primed = _last(service.prime_image(source, "a blue star", keep_rows=3, num_images=2, temperature=0.8, top_k=16,
                                       cond_scale=1.5, seed=7, box=(0.25, 0.5, 1.0, 1.0))).files[1]
    values = Handlers.restore(primed)
    assert len(values) == len(Handlers.RESTORED)
    t2i, params, prime, tab = values[:7], values[7], values[8:22], values[22]
    assert all(isinstance(v, type(gr.skip())) for v in t2i) and params["kind"] == "prime_image"
    assert prime == (primed, "a blue star", 3, True, 0.25, 0.5, 1.0, 1.0, 2, 0.8, 16, 1.0, 1.5, 8)
    assert tab.selected == "prime"
    named = dict(zip(Handlers.RESTORED, values))
    assert (named["keep_rows"], named["box_top"], named["prime_top_k"], named["prime_seed"]) == (3, 0.5, 16, 8)
    values = Handlers.restore(source)
    assert values[:7] == ("a red circle", 1, 1.0, 64, 1.0, 2.0, 0) and values[7]["kind"] == "text_to_image"
    assert all(isinstance(v, type(gr.skip())) for v in values[8:])
