"""`meditron-jax SUBCOMMAND ...`: a thin dispatcher. Each subcommand lives in the module that
owns the work and exposes `add_arguments(parser)` and `run(args) -> int`; only the chosen
module is imported. User errors (`meditron_jax.errors.UserError`) become one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("meditron_jax.train", "continued pretraining / fine-tuning from gin files"),
    "import": ("meditron_jax.convert.cli_import", "Llama-2 weights (Hugging Face or Meta) -> step-0 checkpoint"),
    "export": ("meditron_jax.convert.cli_export", "checkpoint -> Hugging Face safetensors or Meta consolidated.pth"),
    "preprocess": ("meditron_jax.data.preprocess", "JSONL text -> tokenized ArrayRecord shards + manifest"),
    "tokenizer": ("meditron_jax.data.tokenizer", "train a small SentencePiece tokenizer (demos, tests)"),
    "data": ("meditron_jax.data.cli", "data utilities (mcq-to-sft)"),
    "eval": ("meditron_jax.eval.cli", "perplexity and k-shot medical multiple-choice exams"),
    "generate": ("meditron_jax.eval.generate", "sample text with a KV cache"),
    "plan": ("meditron_jax.plan", "compile the train step ahead of time and report memory / FLOPs"),
}


def _usage() -> str:
    lines = ["usage: meditron-jax SUBCOMMAND [args...]", "", "subcommands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"meditron-jax: error: unknown subcommand {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = SUBCOMMANDS[name]
    import logging

    from meditron_jax.errors import UserError
    from meditron_jax.hostmem import keep_freed_memory

    keep_freed_memory()  # before JAX starts its threads: reuse freed host memory (hostmem.py)
    from meditron_jax.targets import quiet_cuda_plugin_notice
    quiet_cuda_plugin_notice()  # the compile-only CUDA plugin's "no driver" notices (plan extra)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's info/warning chatter

    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"meditron-jax {name}", description=help_)
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"meditron-jax {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meditron-jax {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
