"""End to end: `python app.py` on 127.0.0.1 with a tiny model; every API endpoint through gradio_client and the
text-to-image tab in headless Chromium (Debian's /usr/bin/chromium through Playwright)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("youtokentome")
gradio_client = pytest.importorskip("gradio_client")

from dalle_app.service import read_parameters

from reliability_server import start_app, stop_app

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = os.environ.get("DALLE_APP_SCREENSHOTS")  # folder to save tab screenshots into (for the README)


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


def test_api_text_to_image_and_prime_and_reconstruct(client):
    files, info = client.predict("a red circle", 2, 1.0, 16, 1.0, 11, api_name="/text_to_image")
    paths = _paths(files)
    assert info["seeds"] == [11, 12] and len(paths) == 2 and paths[0].endswith(".png")
    assert read_parameters(paths[1])["seed"] == 12  # the PNG text chunk survives the trip through Gradio
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


def test_browser_text_to_image_tab(server):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium); browser test skipped")
    playwright = pytest.importorskip("playwright.sync_api")
    url, _ = server
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        prompt = page.get_by_label("Prompt", exact=True)
        prompt.fill("a green triangle on a white background")
        seed = page.get_by_label("Seed (-1 = random)").first
        seed.fill("21")
        prompt.press("Enter")  # Enter submits
        page.locator("#info").get_by_text('"seeds"').wait_for(timeout=30000)
        page.wait_for_function("() => document.querySelectorAll('#gallery img').length >= 4", timeout=30000)
        assert "21" in page.locator("#info").inner_text()
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(SCREENSHOTS) / "text_to_image.png"), full_page=True)
        page.get_by_role("button", name="🎲").click()
        page.wait_for_function("() => [...document.querySelectorAll('input[type=number]')].some(e => e.value === '-1')")
        page.get_by_role("button", name="♻️").click()
        page.wait_for_function("() => [...document.querySelectorAll('input[type=number]')].some(e => e.value === '21')")
        if SCREENSHOTS:
            for tab, name in (("Image priming", "image_priming"), ("VAE reconstruction", "vae_reconstruction"),
                              ("Text completion", "text_completion")):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(400)
                page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)
        browser.close()


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
