"""`python app.py`: serve dalle_app's Gradio app (the built-in model by default). `python app.py --help` for flags."""

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def main() -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Serve DALLE-pytorch models in a Gradio app.")
    parser.add_argument("--model", default=env("DALLE_APP_MODEL"), help="catalog name, Hub reference or local path "
                        "(default: the built-in shapes-dalle; env DALLE_APP_MODEL)")
    parser.add_argument("--device", default=env("DALLE_APP_DEVICE"), help="cuda, cpu, mps (default: best available)")
    parser.add_argument("--dtype", default=env("DALLE_APP_DTYPE"), help="bf16, fp16 or fp32 (default: bf16 on CUDA)")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="env GRADIO_SERVER_NAME")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")),
                        help="env GRADIO_SERVER_PORT")
    parser.add_argument("--queue-size", type=int, default=int(env("DALLE_APP_QUEUE_SIZE", "32")),
                        help="most requests waiting in the queue (env DALLE_APP_QUEUE_SIZE)")
    parser.add_argument("--concurrency", type=int, default=int(env("DALLE_APP_CONCURRENCY", "1")),
                        help="requests computing on the model at once (GPU workers; env DALLE_APP_CONCURRENCY)")
    parser.add_argument("--max-active", type=int, default=int(env("DALLE_APP_MAX_ACTIVE", "0")) or None,
                        help="requests interleaved fairly on the model at once, each taking turns of a fraction of "
                             "a second (default: 4 per worker; env DALLE_APP_MAX_ACTIVE)")
    parser.add_argument("--compile", action="store_true", default=env("DALLE_APP_COMPILE", "") not in ("", "0"),
                        help="fuse the decoding step with torch.compile: faster on CUDA (about 1.6x), but the first "
                             "request of each batch size compiles for a while (env DALLE_APP_COMPILE=1)")
    args = parser.parse_args()

    from dalle_app.manager import Catalog, ModelLoadError
    from dalle_app.service import Service
    from dalle_app.ui import build_demo

    try:
        service = Service(Catalog().get(args.model) if args.model else None, device=args.device, dtype=args.dtype,
                          concurrency=args.concurrency, max_active=args.max_active, compile_step=args.compile)
    except (ModelLoadError, ValueError, OSError) as exc:  # one sentence, no traceback
        raise SystemExit(f"error: {exc}") from None
    # Gradio lets the service's max_active requests through at once; the service's scheduler gives them fair turns
    # on its `concurrency` workers, and the rest wait in Gradio's queue (their position is shown).
    demo = build_demo(service)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=service.max_active)
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(service.output_dir)],
                show_error=True)


if __name__ == "__main__":
    main()
