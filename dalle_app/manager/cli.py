"""Command line: `python -m dalle_app info --model REF` and `python -m dalle_app convert dalle.pt OUT_DIR`."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ModelLoadError


def _json_arg(text: str | None) -> dict | None:
    if not text:
        return None
    from pathlib import Path

    path = Path(text)
    raw = path.read_text() if path.is_file() else text
    try:
        value = json.loads(raw)
    except ValueError:
        raise SystemExit(f"error: --hparams must be a JSON object or a JSON file, got {text!r}") from None
    return value


def info_main(argv: list[str]) -> int:
    """Print a model's description as JSON."""
    parser = argparse.ArgumentParser(prog="python -m dalle_app info", description="Describe a model as JSON.")
    parser.add_argument("--model", required=True, help="local folder/file or Hub reference owner/name[:path][@rev]")
    parser.add_argument("--tokenizer", help="tokenizer kind (clip, yttm, hf, chinese) or tokenizer file reference")
    parser.add_argument("--vae", help="separate VAE checkpoint (vae.pt or VQGAN .ckpt) for files without VAE weights")
    parser.add_argument("--hparams", help="DALLE hparams as JSON or a JSON file (for bare state_dicts)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 elsewhere)")
    args = parser.parse_args(argv)
    from .catalog import Catalog
    from .manager import ModelManager

    try:
        manager = ModelManager(device=args.device, dtype=args.dtype)
        model = manager.load(Catalog.default().get(args.model), tokenizer=args.tokenizer, vae=args.vae,
                             hparams=_json_arg(args.hparams))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(model.info(), indent=2, default=str))
    return 0


def convert_main(argv: list[str]) -> int:
    """Convert a DALLE-pytorch checkpoint to the project format."""
    parser = argparse.ArgumentParser(prog="python -m dalle_app convert",
                                     description="Convert a DALLE-pytorch checkpoint to dalle_app's format.")
    parser.add_argument("checkpoint", help="dalle.pt, a DeepSpeed -ds-cp folder, or a state_dict file")
    parser.add_argument("out_dir", help="folder to write config.json, model.safetensors, vae.safetensors into")
    parser.add_argument("--bpe", help="tokenizer file the model was trained with (.bpe, tokenizer.json, CLIP vocab)")
    parser.add_argument("--tokenizer-kind", help="clip, yttm, hf or chinese (default: inferred)")
    parser.add_argument("--vae", help="VAE checkpoint for DALLE files saved without VAE weights")
    parser.add_argument("--hparams", help="DALLE hparams as JSON or a JSON file (for bare state_dicts)")
    parser.add_argument("--card", help="a README.md model card to copy into the folder")
    args = parser.parse_args(argv)
    from pathlib import Path

    from .pretrained import convert_checkpoint

    try:
        card = Path(args.card).read_text() if args.card else None
        out = convert_checkpoint(args.checkpoint, args.out_dir, tokenizer_file=args.bpe,
                                 tokenizer_kind=args.tokenizer_kind, hparams=_json_arg(args.hparams), vae=args.vae,
                                 card=card)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
