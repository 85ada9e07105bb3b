"""Check the app's service on CUDA with the built-in model: two users at once (fair turns, CUDA graphs captured
inside each request's turn), reranking, priming, reconstruction and text completion; prints timings.

    python benchmarks/service_cuda_check.py [--device cuda] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dalle_app.service import Service, read_parameters  # noqa: E402


def last(updates):
    final = None
    for u in updates:
        final = u
    return final


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="the service samples with the torch.compile'd step")
    args = ap.parse_args()
    service = Service(None, device=args.device, compile_step=args.compile)
    print("model", service.default_reference, service.model.device, service.model.dtype, flush=True)
    for n in (1, 4, 4):  # the first call captures the graph
        t = time.perf_counter()
        u = last(service.text_to_image("a red star on a blue background", n, top_k=64, cond_scale=3.0, seed=1))
        print(f"text_to_image {n} images, guidance 3: {time.perf_counter() - t:.2f} s, files {len(u.files)}")
    results, errors = {}, []

    def user(name, prompt, count):
        try:
            t = time.perf_counter()
            results[name] = (last(service.text_to_image(prompt, count, cond_scale=3.0, seed=5)),
                             time.perf_counter() - t)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=user, args=("big", "a large green heart", 16)),
               threading.Thread(target=user, args=("small", "a small yellow circle in the top left", 1))]
    for th in threads:
        th.start()
        time.sleep(0.05)
    for th in threads:
        th.join()
    print("errors", errors)
    for name, (u, sec) in results.items():
        prompts = {read_parameters(f)["prompt"] for f in u.files}
        print(f"concurrent {name}: {sec:.2f} s, {len(u.files)} files, prompts {prompts}")
    u = last(service.text_to_image("a purple ring", 8, cond_scale=3.0, seed=0, rerank_keep=2))
    print("rerank 8 -> 2:", len(u.files), u.info.get("clip_scores") or {k: v for k, v in u.info.items() if "clip" in k})
    image = results["small"][0].files[0]
    u = last(service.prime_image(image, "a small yellow circle in the top left", keep_rows=8, num_images=2,
                                 cond_scale=3.0, seed=0))
    print("prime_image:", len(u.files), u.progress_text)
    u = last(service.reconstruct(image))
    print("reconstruct:", u.progress_text)
    u = last(service.complete_text("a small", 3, seed=0))
    print("complete_text:", u.texts)


if __name__ == "__main__":
    main()
