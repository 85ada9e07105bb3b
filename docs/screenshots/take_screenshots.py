"""Retake the README screenshots: start `python app.py` (the built-in model unless --model), run one example on each
tab in headless Chromium (Debian's /usr/bin/chromium through Playwright) and save one PNG per tab plus the model panel.

    python docs/screenshots/take_screenshots.py                 # writes docs/screenshots/*.png
    python docs/screenshots/take_screenshots.py --model weights/shapes-dalle --out /tmp/shots
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 300_000  # the built-in model on a small CPU takes a few seconds per request


def start(model: str | None, port: int, log: Path) -> subprocess.Popen:
    """Start app.py on 127.0.0.1:port and wait until it answers."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1")
    args = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(args + (["--model", model] if model else []), cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: app.py exited early; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"error: app.py did not answer within 120 s; see {log}")


def shoot(url: str, out: Path) -> list[Path]:
    """Drive each tab through its first example and save the screenshots; return their paths."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    saved = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)

        def save(name, locator=None):
            path = out / f"{name}.png"
            (locator or page).screenshot(path=str(path), **({} if locator else {"full_page": True}))
            saved.append(path)

        page.locator("#t2i-examples [data-testid=dataset-cell-0-0]").click()
        page.locator("#info").get_by_text('"seeds"').wait_for(timeout=WAIT_MS)
        page.wait_for_timeout(500)
        save("text_to_image")

        page.get_by_role("tab", name="Image priming").click()
        page.locator("#prime-examples [data-testid=dataset-cell-0-1]").click()
        page.locator("#prime-info").get_by_text('"seeds"').wait_for(timeout=WAIT_MS)
        page.wait_for_timeout(500)
        save("image_priming")

        page.get_by_role("tab", name="VAE reconstruction").click()
        page.locator("#vae-examples .gallery-item").first.click()
        page.locator("#vae-info").get_by_text('"psnr_db"').wait_for(timeout=WAIT_MS)
        page.wait_for_timeout(500)
        save("vae_reconstruction")

        page.get_by_role("tab", name="Text completion").click()
        page.locator("#text-examples [data-testid=dataset-cell-0-0]").click()
        page.locator("#text-info").get_by_text('"seeds"').wait_for(timeout=WAIT_MS)
        page.wait_for_timeout(500)
        save("text_completion")

        page.get_by_role("tab", name="Text to image").click()
        page.locator("#model-panel").get_by_text("Model", exact=True).first.click()
        page.locator("#model-summary").wait_for(timeout=10000)
        page.wait_for_timeout(500)
        save("model_panel", page.locator("#model-panel"))
        browser.close()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description="Retake the README screenshots with the app's built-in model.")
    parser.add_argument("--model", help="model to serve (default: the app's default, the built-in shapes-dalle)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"), help="folder for the PNGs")
    parser.add_argument("--port", type=int, default=0, help="port for app.py (default: a free one)")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"error: {CHROMIUM} is missing; install Debian's chromium (apt-get install -y chromium).")
    port = args.port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    log = Path(args.out) / "app.log"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    proc = start(args.model, port, log)
    try:
        for path in shoot(f"http://127.0.0.1:{port}/", Path(args.out)):
            print(path)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
