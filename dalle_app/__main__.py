"""`python -m dalle_app COMMAND ...`: each command lives in the module that owns it."""

from __future__ import annotations

import importlib
import sys

# command -> "module:function(argv) -> exit code"; add new commands here.
COMMANDS = {
    "info": ("dalle_app.manager.cli:info_main", "print a model's hparams, VAE, tokenizer, size and files as JSON"),
    "convert": ("dalle_app.manager.cli:convert_main", "convert a DALLE-pytorch checkpoint to dalle_app's format"),
    "generate": ("dalle_app.cli:generate_main", "text to image: PNGs with their parameters in a text chunk"),
    "reconstruct": ("dalle_app.cli:reconstruct_main", "VAE round trip of an image: input, reconstruction, token grid"),
    "complete": ("dalle_app.cli:complete_main", "continue a text prompt with the model's text head"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: python -m dalle_app COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module_name, func = COMMANDS[argv[0]][0].split(":")
    return getattr(importlib.import_module(module_name), func)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
