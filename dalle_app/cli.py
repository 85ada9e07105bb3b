"""`python -m dalle_app generate | reconstruct | complete`: the app's requests from scripts, writing the same PNGs."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def _service(args):
    from .manager import Catalog
    from .service import Service

    return Service(Catalog().get(args.model) if args.model else None, device=args.device, dtype=args.dtype,
                   output_dir=args.out)


def _common(parser: argparse.ArgumentParser, out: bool = True) -> None:
    parser.add_argument("--model", default=None, help="catalog name, Hub reference or local path (default: built-in)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    if out:
        parser.add_argument("--out", default="outputs", help="folder for the PNGs (default: outputs)")


def _sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--num", type=int, default=4, help="how many")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: what the model's config recommends for images, else 1; 1 for text")
    parser.add_argument("--top-k", type=int, default=None,
                        help="0 = no limit (default: what the model's config recommends, else 64; 8 for the "
                             "built-in model)")
    parser.add_argument("--seed", type=int, default=-1, help="seed of the first one; the others get seed+1, ...")


def _run(main_fn, argv):
    from .manager import ModelLoadError
    from .service import RequestError

    try:
        return main_fn(argv)
    except (RequestError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _report(last) -> int:
    for path in last.files:
        print(path)
    print(json.dumps(last.info), file=sys.stderr)
    return 0


def _generate(argv):
    parser = argparse.ArgumentParser(prog="python -m dalle_app generate", description="Text to image.")
    _common(parser)
    parser.add_argument("--prompt", required=True)
    _sampling(parser)
    parser.add_argument("--cond-scale", type=float, default=None,
                        help="classifier-free guidance, 1 = off (default: what the model's config recommends, as in "
                             "the app: 1.5 for the built-in model; 1 for models that recommend nothing)")
    parser.add_argument("--rerank-keep", type=int, default=0, help="keep CLIP's best M of the -n images")
    args = parser.parse_args(argv)
    service = _service(args)
    if None in (args.cond_scale, args.top_k, args.temperature):
        from .manager import recommended_sampling

        vars(args).update(recommended_sampling(service.load(service.default_reference), cond_scale=args.cond_scale,
                                               top_k=args.top_k, temperature=args.temperature))
    updates = service.text_to_image(args.prompt, args.num, args.temperature, args.top_k, args.cond_scale,
                                    args.seed, rerank_keep=args.rerank_keep)
    return _report(list(updates)[-1])


def _reconstruct(argv):
    parser = argparse.ArgumentParser(prog="python -m dalle_app reconstruct",
                                     description="VAE round trip: input, reconstruction and token grid PNGs.")
    _common(parser)
    parser.add_argument("image")
    args = parser.parse_args(argv)
    return _report(list(_service(args).reconstruct(args.image))[-1])


def _complete(argv):
    parser = argparse.ArgumentParser(prog="python -m dalle_app complete", description="Text completion.")
    _common(parser, out=False)
    parser.add_argument("--prompt", default="")
    _sampling(parser)
    args = parser.parse_args(argv)
    args.out = None
    service = _service(args)
    last = list(service.complete_text(args.prompt, args.num, 1.0 if args.temperature is None else args.temperature,
                                        64 if args.top_k is None else args.top_k, args.seed))[-1]
    shutil.rmtree(service.output_dir, ignore_errors=True)  # no files for text
    print("\n".join(last.texts))
    print(json.dumps(last.info), file=sys.stderr)
    return 0


def generate_main(argv) -> int:
    """CLI entry: text to image."""
    return _run(_generate, argv)


def reconstruct_main(argv) -> int:
    """CLI entry: VAE reconstruction."""
    return _run(_reconstruct, argv)


def complete_main(argv) -> int:
    """CLI entry: text completion."""
    return _run(_complete, argv)
