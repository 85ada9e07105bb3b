"""`python app.py`: serve dalle_app's Gradio app (the built-in model by default). `python app.py --help` for flags."""

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# flags whose default is a whole number from an environment variable: dest -> (variable, default, minimum, maximum)
ENV_NUMBERS = {"port": ("GRADIO_SERVER_PORT", 7860, 1, 65535), "queue_size": ("DALLE_APP_QUEUE_SIZE", 32, 1, None),
               "concurrency": ("DALLE_APP_CONCURRENCY", 1, 1, None), "max_active": ("DALLE_APP_MAX_ACTIVE", 0, 0, None),
               "cache_minutes": ("DALLE_APP_CACHE_MINUTES", 60, 1, None)}


def _limits(minimum: int, maximum: int | None) -> str:
    return f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"


def _whole_number(text: str, minimum: int, maximum: int | None) -> int | None:
    """int(text) when it is a whole number within the limits, else None."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= minimum and (maximum is None or value <= maximum) else None


def _number(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number within [minimum, maximum]."""
    def parse(text: str) -> int:
        value = _whole_number(text, minimum, maximum)
        if value is None:
            raise argparse.ArgumentTypeError(f"expected a whole number {_limits(minimum, maximum)}, got {text!r}")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a flag that is not given takes its value from the environment variable it names. A bad
    value, on the command line or in the environment, ends the program as argparse does: one sentence on stderr and
    exit status 2."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Serve DALLE-pytorch models in a Gradio app.",
        epilog="Also read: HF_HUB_OFFLINE, HF_HOME, HF_ENDPOINT, HF_TOKEN (Hub downloads), DALLE_APP_MODEL_DIRS "
               "(folders local models may come from), DALLE_APP_MEMORY_BUDGET (model cache).")
    parser.add_argument("--model", default=env("DALLE_APP_MODEL"), help="catalog name, Hub reference or local path "
                        "(default: the built-in shapes-dalle; env DALLE_APP_MODEL)")
    parser.add_argument("--device", default=env("DALLE_APP_DEVICE"),
                        help="cuda, cpu, mps (default: best available; env DALLE_APP_DEVICE)")
    parser.add_argument("--dtype", default=env("DALLE_APP_DTYPE"),
                        help="bf16, fp16 or fp32 (default: bf16 on CUDA; env DALLE_APP_DTYPE)")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1; env GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=_number(1, 65535),
                        help="port to listen on (default 7860; env GRADIO_SERVER_PORT)")
    parser.add_argument("--queue-size", type=_number(1),
                        help="most requests waiting in the queue (default 32; env DALLE_APP_QUEUE_SIZE)")
    parser.add_argument("--concurrency", type=_number(1), help="requests computing on the model at once (GPU "
                        "workers; default 1; env DALLE_APP_CONCURRENCY)")
    parser.add_argument("--max-active", type=_number(1),
                        help="requests interleaved fairly on the model at once, each taking turns of a fraction of "
                             "a second (default: 4 per worker; env DALLE_APP_MAX_ACTIVE, 0 = the default)")
    parser.add_argument("--cache-minutes", type=_number(1),
                        help="how long the images Gradio serves (previews and galleries, copied to its cache) are "
                             "kept before they are deleted (default 60; env DALLE_APP_CACHE_MINUTES); the PNGs with "
                             "parameters in the output folder follow their own retention")
    parser.add_argument("--compile", action="store_true", default=env("DALLE_APP_COMPILE", "") not in ("", "0"),
                        help="fuse the PyTorch decoding step with torch.compile instead of the Triton step: only for "
                             "CUDA models the Triton step does not cover (reversible, stable), where it is about "
                             "1.6x faster; the first request of each batch size compiles for a while "
                             "(env DALLE_APP_COMPILE=1)")
    args = parser.parse_args(argv)
    for dest, (name, default, minimum, maximum) in ENV_NUMBERS.items():
        if getattr(args, dest) is None:
            text = env(name, "").strip()
            value = _whole_number(text, minimum, maximum) if text else default
            if value is None:
                parser.exit(2, f"{parser.prog}: error: {name} must be a whole number {_limits(minimum, maximum)}, "
                               f"got {text!r}.\n")
            setattr(args, dest, value)
    args.max_active = args.max_active or None  # None: the service's default
    # Gradio reads these two when it is imported: give it the values in use (a flag wins over the environment)
    os.environ["GRADIO_SERVER_PORT"], os.environ["GRADIO_SERVER_NAME"] = str(args.port), args.host
    return args


def main() -> None:
    args = parse_args()

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
    demo = build_demo(service, cache_seconds=60 * args.cache_minutes)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=service.max_active)
    try:
        demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(service.output_dir)],
                    show_error=True)
    except OSError as exc:  # the port is taken, the address is not this machine's: one sentence
        if "empty port" in str(exc):  # Gradio's words, which name its own parameters
            raise SystemExit(f"error: port {args.port} on {args.host} is in use; choose another with --port or "
                             "GRADIO_SERVER_PORT.") from None
        lines = str(exc).strip().splitlines()
        raise SystemExit(f"error: {lines[0] if lines else type(exc).__name__}") from None


if __name__ == "__main__":
    main()
