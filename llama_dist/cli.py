"""`llama-dist <command>`: thin wrappers over the modules, one line per expected mistake."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Optional

# command -> (module:function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "config": ("llama_dist.cli:config_cli", "print the resolved config as YAML"),
    "tokenizer": ("llama_dist.tokenizer:cli", "train a sentencepiece BPE tokenizer"),
    "prepare": ("llama_dist.prepare:cli", "pretokenize a corpus into shards"),
    "train": ("llama_dist.train:cli", "train (in-process, or torchrun with --nproc N)"),
    "reshard": ("llama_dist.reshard_cli:cli", "change a checkpoint's model-parallel size"),
    "generate": ("llama_dist.generation:cli", "generate text from a checkpoint"),
    "eval": ("llama_dist.evaluate:cli", "validation loss and perplexity of a checkpoint"),
    "export-hf": ("llama_dist.export_hf:cli", "write a transformers LlamaForCausalLM directory"),
    "demo": ("llama_dist.demo:cli", "tokenizer, data, training, reshard and generation in one go"),
}
# Commands that, once they return, have fsynced all they wrote and left no thread running.
# Their process ends with os._exit and skips the interpreter's teardown: 0.4-0.6 s with
# torch imported, and 0.0-0.07 s since the reshard imports none (both on a 2-core VM).
QUICK_EXIT = {"reshard"}


def config_cli(argv: list[str]) -> int:
    import argparse

    from llama_dist.config import load_config

    parser = argparse.ArgumentParser(prog="llama-dist config", description="Print the resolved config.")
    parser.add_argument("config", help="a YAML file or a bundled name (tiny, small, llama2-7b, ...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=10")
    args = parser.parse_args(argv)
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: llama-dist <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from llama_dist.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llama-dist: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except UserError as err:
        print(f"llama-dist {name}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from llama_dist.files import is_disk_full

        if not is_disk_full(err):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"llama-dist {name}: error: {err.strerror}{where}; free some space (df -h) and run it again",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-dist {name}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `llama-dist` console script: main(), then the process's exit."""
    argv = sys.argv[1:]
    code = main(argv)
    if argv and argv[0] in QUICK_EXIT:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
