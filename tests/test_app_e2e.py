"""End to end: `python app.py` on 127.0.0.1 with a tiny model; every API endpoint through gradio_client, and every
tab in headless Chromium (Debian's /usr/bin/chromium through Playwright): one-click examples, top-p, the progress
bar, send-to-priming, CLIP reranking, reading a PNG's parameters back, priming an uploaded image with kept rows and
a box, two browser sessions each on its own model, and errors shown as one sentence. Queueing, Stop and live previews: test_app_stop_e2e.py."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("youtokentome")
gradio_client = pytest.importorskip("gradio_client")

from dalle_app.service import read_parameters

from app_factory import make_tiny_model
from browser_helpers import (browser, fill, gallery_parameters, open_page, set_slider, wait_images,  # noqa: F401
                             watch_progress)
from reliability_server import start_app, stop_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    proc, url, _ = start_app(root)
    yield url, root
    stop_app(proc)


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False)


def _paths(files):
    return [f["image"] if isinstance(f, dict) else f for f in files]


def test_api_lists_the_four_named_endpoints_with_their_parameter_names(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    expected = {
        "/text_to_image": ["prompt", "num_images", "temperature", "top_k", "cond_scale", "seed"],
        "/prime_image": ["image", "prompt", "keep_rows", "num_images", "temperature", "top_k", "cond_scale", "seed"],
        "/reconstruct": ["image"],
        "/complete_text": ["prompt", "num_completions", "temperature", "top_k", "seed"],
    }
    assert set(endpoints) == set(expected)
    for name, params in expected.items():
        assert [p["parameter_name"] for p in endpoints[name]["parameters"]] == params


def test_api_text_to_image_and_prime_and_reconstruct(server, client):
    files, info = client.predict("a red circle", 2, 1.0, 16, 1.0, 11, api_name="/text_to_image")
    paths = _paths(files)
    assert info["seeds"] == [11, 12] and len(paths) == 2 and paths[0].endswith(".png")
    assert isinstance(info["seconds"], float) and 0 < info["seconds"] < 60  # the timing, in seconds
    params = read_parameters(paths[1])  # the PNG text chunk survives the trip through Gradio
    assert params["seed"] == 12 and params["prompt"] == "a red circle"
    assert params["model"] == str(server[1] / "model") and "revision" in params  # None for a local folder
    files, info = client.predict(gradio_client.handle_file(paths[0]), "a blue square", 2, 3, 1.0, 16, 2.0, 0,
                                 api_name="/prime_image")
    assert info["seeds"] == [0, 1, 2] and read_parameters(_paths(files)[0])["settings"]["keep_rows"] == 2
    files, info = client.predict(gradio_client.handle_file(paths[0]), api_name="/reconstruct")
    assert len(files) == 3 and info["psnr_db"] > 0 and info["codebook_used"] >= 1


def test_api_complete_text_and_errors(client):
    text, info = client.predict("a red", 2, 1.0, 16, 4, api_name="/complete_text")
    assert info["seeds"] == [4, 5] and all(line.startswith("a red") for line in text.splitlines())
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("  ", 1, 1.0, 16, 1.0, 0, api_name="/text_to_image")
    with pytest.raises(Exception, match="minimum value 0.05|Temperature must be between"):
        client.predict("a red circle", 1, 0, 16, 1.0, 0, api_name="/text_to_image")


def test_browser_text_to_image_tab(server, browser):
    url, _ = server
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    prompt = page.get_by_label("Prompt", exact=True)
    fill(prompt, "a green triangle on a white background")
    seed = page.get_by_label("Seed (-1 = random)").first
    fill(seed, "21")
    prompt.press("Enter")  # Enter submits
    page.locator("#info").get_by_text('"seeds"').wait_for(timeout=30000)
    page.wait_for_function("() => document.querySelectorAll('#gallery img').length >= 4", timeout=30000)
    assert "21" in page.locator("#info").inner_text()
    page.get_by_role("button", name="🎲").click()
    page.wait_for_function("() => [...document.querySelectorAll('input[type=number]')].some(e => e.value === '-1')")
    page.get_by_role("button", name="♻️").click()
    page.wait_for_function("() => [...document.querySelectorAll('input[type=number]')].some(e => e.value === '21')")
    page.close()


def test_browser_example_click_with_top_p_shows_progress_and_sends_to_priming(server, browser):
    url, _ = server
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    set_slider(page, "t2i-top-p", 0.85)
    watch_progress(page, "#progress")
    example = page.locator("#t2i-examples [data-testid=dataset-cell-1-0]")
    example.click()  # one click: fills the prompt and seed and runs
    wait_images(page, "#gallery", 4, "#info")
    prompt = page.get_by_label("Prompt", exact=True).input_value()
    assert prompt
    seen = page.evaluate("() => window.progressSeen")
    assert any("tokens/s" in s and "left" in s and not s.startswith("100|") for s in seen), seen  # a live bar
    assert seen[-1].startswith("100|") and "done" in seen[-1]
    params = gallery_parameters(page)
    assert [p["seed"] for p in params] == [1, 2, 3, 4] and params[0]["prompt"] == prompt
    assert all(p["settings"]["top_p"] == pytest.approx(0.85) for p in params)  # the slider reached the service

    page.locator("#gallery img").nth(2).click()  # pick the third image
    page.locator("#send-to-priming").click()
    page.get_by_role("tab", name="Image priming", selected=True).wait_for(timeout=10000)
    page.wait_for_function("() => document.querySelector('#prime-input img')", timeout=10000)
    sent = page.locator("#prime-input img").get_attribute("src")
    assert sent.endswith(".png") and "seed3" in sent
    assert page.locator("#prime-prompt textarea").input_value() == prompt
    page.locator("#prime-run").click()  # the sent image is a usable priming input
    wait_images(page, "#prime-gallery", 4, "#prime-info")

    page.locator("#prime-examples [data-testid=dataset-cell-0-1]").click()  # a priming example
    page.locator("#prime-gallery img[src*='-seed0.png']").wait_for(timeout=30000)
    params = gallery_parameters(page, "#prime-gallery")
    assert params[0]["seed"] == 0 and params[0]["settings"]["keep_rows"] == 4

    page.get_by_role("tab", name="VAE reconstruction").click()
    page.locator("#vae-examples .gallery-item").first.click()
    wait_images(page, "#vae-gallery", 3)
    page.locator("#vae-info").get_by_text('"psnr_db"').wait_for(timeout=30000)

    page.get_by_role("tab", name="Text completion").click()
    set_slider(page, "text-top-p", 0.9)
    page.locator("#text-examples [data-testid=dataset-cell-0-0]").click()
    page.wait_for_function("() => document.querySelector('#completions textarea').value.split('\\n').length == 4",
                           timeout=30000)
    prefix = page.locator("#text-examples [data-testid=dataset-cell-0-0]").inner_text().strip()
    lines = page.locator("#completions textarea").input_value().splitlines()
    assert all(line.startswith(prefix) for line in lines)
    page.close()


def _generate(page, seed: int) -> dict:
    fill(page.get_by_label("Prompt", exact=True), "a red circle")
    fill(page.get_by_label("Seed (-1 = random)").first, str(seed))
    page.locator("#generate").click()
    image = page.locator(f"#gallery img[src*='-seed{seed}.png']").first
    image.wait_for(timeout=30000)
    return read_parameters(io.BytesIO(page.request.get(image.get_attribute("src")).body()))


def test_two_browser_sessions_each_keep_their_own_model(server, browser):
    url, root = server
    other = make_tiny_model(root / "other", seed=1, with_clip=False)
    a, b = browser.new_context(), browser.new_context()
    page_a, page_b = a.new_page(), b.new_page()
    for page in (page_a, page_b):
        page.goto(url)
    page_a.locator("#model-panel").get_by_text("Model", exact=True).first.click()  # open the accordion
    fill(page_a.get_by_label("Hub reference or local path"), str(other))
    page_a.locator("#load-model").click()
    try:
        page_a.locator("#model-summary").get_by_text(str(other)).first.wait_for(timeout=60000)
    except Exception:  # say what the page shows instead
        box = page_a.get_by_label("Hub reference or local path").input_value()
        pytest.fail(f"the model summary never named {other}; reference box: {box!r}; summary: "
                    f"{page_a.locator('#model-summary').inner_text()[:300]!r}; page text: "
                    f"{page_a.locator('body').inner_text()[-600:]!r}")
    assert _generate(page_b, 31)["model"] == str(root / "model")  # B never asked: the default
    assert _generate(page_a, 32)["model"] == str(other)
    assert _generate(page_b, 33)["model"] == str(root / "model")  # A's switch did not reach B
    for page, model in ((page_a, other), (page_b, root / "model")):  # the other tabs follow the session's model too
        page.get_by_role("tab", name="VAE reconstruction").click()
        page.locator("#vae-examples .gallery-item").first.click()
        page.locator("#vae-info").get_by_text(str(model)).wait_for(timeout=30000)
    page_b.locator("#model-panel").get_by_text("Model", exact=True).first.click()
    page_b.locator("#model-summary").get_by_text(str(root / "model")).first.wait_for(timeout=10000)
    assert str(other) not in page_b.locator("#model-summary").inner_text()
    a.close()
    b.close()


def test_cli_generate_writes_the_same_pngs(server, tmp_path):
    _, root = server
    env = dict(os.environ, DALLE_APP_MODEL_DIRS=str(root))
    out = subprocess.run([sys.executable, "-m", "dalle_app", "generate", "--model", str(root / "model"), "--prompt",
                          "a red circle", "-n", "2", "--seed", "0", "--out", str(tmp_path), "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert len(files) == 2 and [read_parameters(f)["seed"] for f in files] == [0, 1]
    bad = subprocess.run([sys.executable, "-m", "dalle_app", "generate", "--model", str(root / "missing"),
                          "--prompt", "x"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and bad.stderr.startswith("error:")


def test_browser_clip_rerank_keeps_the_best_m_with_their_scores(server, browser):
    page = open_page(browser, server[0])
    fill(page.get_by_label("Prompt", exact=True), "a red circle on a blue background")
    fill(page.get_by_label("Seed (-1 = random)").first, "5")
    set_slider(page, "t2i-n", 3)
    page.locator("#t2i-rerank input[type=checkbox]").check()
    set_slider(page, "t2i-keep", 2)
    page.locator("#generate").click()
    wait_images(page, "#gallery", 2, "#info")
    page.locator("#progress").get_by_text("done").wait_for(timeout=30000)
    captions = page.locator("#gallery .caption-label").all_inner_texts()
    matches = [re.fullmatch(r"seed (\d+) · CLIP (-?\d+\.\d{3})", c) for c in captions]
    assert len(captions) == 2 and all(matches), captions  # M = 2 of N = 3, each with its seed and CLIP score
    scores = [float(m.group(2)) for m in matches]
    assert scores == sorted(scores, reverse=True)  # best first
    params = gallery_parameters(page)
    assert [p["seed"] for p in params] == [int(m.group(1)) for m in matches]
    assert {p["seed"] for p in params} < {5, 6, 7} and params[0]["settings"]["rerank_keep"] == 2
    page.close()


def test_browser_reads_the_parameters_of_an_app_png_back_into_the_controls(server, client, browser):
    files, _ = client.predict("a yellow star on a black background", 3, 0.7, 16, 2.5, 42, api_name="/text_to_image")
    png = _paths(files)[0]
    page = open_page(browser, server[0])
    page.get_by_text("Read parameters from a PNG").click()  # open the accordion
    page.locator("#png-file input[type=file]").set_input_files(png)
    page.locator("#png-params").get_by_text('"seed"').wait_for(timeout=30000)
    prompt = page.get_by_label("Prompt", exact=True)
    page.wait_for_function("(el) => el.value.startsWith('a yellow star')", arg=prompt.element_handle(), timeout=10000)
    assert prompt.input_value() == "a yellow star on a black background"
    assert page.get_by_label("Seed (-1 = random)").first.input_value() == "42"
    assert page.locator("#t2i-n input[type=number]").input_value() == "3"
    assert float(page.get_by_label("number input for Temperature").first.input_value()) == pytest.approx(0.7)
    assert float(page.get_by_label("number input for Guidance scale (1 = off)").first.input_value()) == 2.5
    page.close()


def test_browser_reads_a_priming_png_back_into_the_priming_tab(server, client, browser):
    files, _ = client.predict("a red circle", 1, 1.0, 16, 1.0, 3, api_name="/text_to_image")
    files, _ = client.predict(gradio_client.handle_file(_paths(files)[0]), "a green heart", 3, 2, 0.9, 8, 1.5, 21,
                              api_name="/prime_image")
    primed = _paths(files)[-1]
    page = open_page(browser, server[0])
    page.get_by_text("Read parameters from a PNG").click()
    page.locator("#png-file input[type=file]").set_input_files(primed)
    page.locator("#prime-input img").wait_for(timeout=30000)  # the PNG itself becomes the image to prime
    prompt = page.locator("#prime-prompt textarea")
    page.wait_for_function("(el) => el.value === 'a green heart'", arg=prompt.element_handle(), timeout=10000)
    assert page.locator("#prime-keep-rows input[type=number]").input_value() == "3"
    assert page.locator("#prime-seed input").input_value() == str(read_parameters(primed)["seed"])
    assert float(page.get_by_label("number input for Temperature").nth(1).input_value()) == pytest.approx(0.9)
    page.close()


def test_browser_primes_an_uploaded_image_keeping_rows_and_a_box(server, browser, tmp_path):
    from PIL import Image

    upload = tmp_path / "white.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(upload)
    page = open_page(browser, server[0])
    page.get_by_role("tab", name="Image priming").click()
    page.locator("#prime-input input[type=file]").set_input_files(str(upload))
    page.locator("#prime-input img").wait_for(timeout=10000)
    fill(page.locator("#prime-prompt textarea"), "a blue square")
    set_slider(page, "prime-keep-rows", 2)
    page.locator("#prime-use-box input[type=checkbox]").check()
    for name, value in (("left", 0.5), ("top", 0.5), ("right", 1), ("bottom", 1)):
        fill(page.locator(f"#prime-box-{name} input"), str(value))
    set_slider(page, "prime-n", 2)
    fill(page.locator("#prime-seed input"), "8")
    page.locator("#prime-run").click()
    page.locator("#prime-kept img").wait_for(timeout=30000)
    wait_images(page, "#prime-gallery", 2, "#prime-info")
    params = gallery_parameters(page, "#prime-gallery")
    assert [p["seed"] for p in params] == [8, 9]
    assert params[0]["settings"]["keep_rows"] == 2 and params[0]["settings"]["box"] == [0.5, 0.5, 1, 1]
    # the kept part shows the white upload where it is kept (top 2 of 8 token rows, the bottom-right quarter) and
    # dims the rest: 32 px images, 4 px per token
    kept = Image.open(io.BytesIO(page.request.get(page.locator("#prime-kept img").get_attribute("src")).body()))
    kept = kept.convert("L")
    assert kept.size == (32, 32)
    assert kept.getpixel((2, 2)) > 200 and kept.getpixel((26, 26)) > 200  # a kept row, inside the box
    assert kept.getpixel((2, 20)) < 120 and kept.getpixel((26, 10)) < 120  # neither
    page.close()


def test_browser_errors_are_one_sentence_and_the_page_keeps_working(server, browser, tmp_path):
    url, root = server
    page = open_page(browser, url)
    fill(page.get_by_label("Prompt", exact=True), "   ")
    page.locator("#generate").click()
    shown = page.get_by_text(re.compile(r"prompt", re.I)).filter(has_text=re.compile(r"empty|give|write", re.I))
    shown.first.wait_for(timeout=30000)
    page.locator(".toast-close").first.click()  # the toast would cover the Load button for its ten seconds
    page.locator("#model-panel").get_by_text("Model", exact=True).first.click()
    box = page.get_by_label("Hub reference or local path")
    for reference, sentence in ((root / "no-such-model", "No file or folder exists at"),
                                (root / "notes.pt", "is not a PyTorch checkpoint")):
        if reference.name == "notes.pt":
            reference.write_text("not a checkpoint")
        fill(box, str(reference))
        page.locator("#load-model").click()
        message = page.locator("#model-status").get_by_text(sentence).first  # beside the button, not a toast
        message.wait_for(timeout=30000)
        text = message.inner_text()
        assert "Traceback" not in page.content() and text.count(". ") <= 1, text
    assert _generate(page, 41)["model"] == str(root / "model")  # still served, on the default model
    page.close()
