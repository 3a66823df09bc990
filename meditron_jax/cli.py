"""`meditron-jax SUBCOMMAND ...`: a thin dispatcher. Each subcommand lives in the module that
owns the work and exposes `add_arguments(parser)` and `run(args) -> int`; only the chosen
module is imported. User errors (`meditron_jax.errors.UserError`) become one line on stderr
and exit status 2; storage faults (a full disk or quota, an I/O error, a read-only or forbidden
filesystem, from any writer: `meditron_jax.errors.StorageFault`) one line and exit status 74.
`--debug` (before or right after the subcommand name) or MEDITRON_JAX_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("meditron_jax.train", "continued pretraining / fine-tuning from gin files"),
    "import": ("meditron_jax.convert.cli_import", "Llama-2 weights (Hugging Face or Meta) -> step-0 checkpoint"),
    "export": ("meditron_jax.convert.cli_export", "checkpoint -> Hugging Face safetensors or Meta consolidated.pth"),
    "preprocess": ("meditron_jax.data.preprocess", "JSONL text -> tokenized ArrayRecord shards + manifest"),
    "tokenizer": ("meditron_jax.data.tokenizer", "train a small SentencePiece tokenizer (demos, tests)"),
    "data": ("meditron_jax.data_cli", "data utilities (mcq-to-sft)"),
    "eval": ("meditron_jax.eval.cli", "perplexity and k-shot medical multiple-choice exams"),
    "generate": ("meditron_jax.eval.generate", "sample text with a KV cache"),
    "lm-eval": ("meditron_jax.eval.lm_eval_cli", "lm-evaluation-harness with the meditron-jax model type"),
    "plan": ("meditron_jax.plan", "compile the train step ahead of time and report memory / FLOPs"),
    "config": ("meditron_jax.config_cli", "print the operative gin config with its defaults (no data, no compile)"),
    "checkpoints": ("meditron_jax.checkpoints_cli", "list a workdir's checkpoints: step, time, size, loss"),
}


def _usage() -> str:
    lines = ["usage: meditron-jax [--version] SUBCOMMAND [args...]", "", "subcommands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def accept_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Every `--long_flag` also answers to `--long-flag` and the other way round (sub-parsers
    included), so one style works everywhere and the old spellings keep working. The help lists
    the spelling each flag was defined with."""
    for action in list(parser._actions):
        for opt in list(action.option_strings):
            if opt.startswith("--") and len(opt) > 3:
                body = opt[2:]
                alt = "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))
                if alt != opt and alt not in parser._option_string_actions:
                    parser._option_string_actions[alt] = action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                accept_both_spellings(sub)


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of subcommand `name` (both flag spellings accepted)."""
    module_name, help_ = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"meditron-jax {name}", description=help_)
    module.add_arguments(parser)
    accept_both_spellings(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = False
    while argv and argv[0] == "--debug" or len(argv) > 1 and argv[1] == "--debug":
        argv = argv[1:] if argv[0] == "--debug" else argv[:1] + argv[2:]
        debug = True
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        from meditron_jax import __version__
        print(f"meditron-jax {__version__}")
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"meditron-jax: error: unknown subcommand {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = SUBCOMMANDS[name]
    from meditron_jax import errors
    from meditron_jax.errors import UserError
    from meditron_jax.hostmem import keep_freed_memory

    keep_freed_memory()  # before JAX starts its threads: reuse freed host memory (hostmem.py)
    from meditron_jax.targets import quiet_cuda_plugin_notice
    quiet_cuda_plugin_notice()  # the compile-only CUDA plugin's "no driver" notices (plan extra)
    from meditron_jax import console

    console.setup()  # one timestamped line format for every subcommand; no absl/Orbax chatter
    debug = debug or errors.debug_enabled()
    if not debug:  # the one line below says it; Orbax's threads would log the same fault with tracebacks
        errors.quiet_fault_logs()

    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"meditron-jax {name}", description=help_)
        module.add_arguments(parser)
        accept_both_spellings(parser)
        args = parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except UserError as e:
        _traceback(debug)
        print(f"meditron-jax {name}: error: {e}", file=sys.stderr)
        return errors.EXIT_USER
    except Exception as e:
        fault = errors.storage_fault(e, name)
        if fault is None:
            raise
        fault = fault.remeasured()  # free space after the partial output was removed
        _traceback(debug)
        print(f"meditron-jax {name}: storage error: {fault}", file=sys.stderr, flush=True)
        if getattr(fault, "exit_now", False):  # threads stuck on a failed multi-process save
            sys.stdout.flush()
            os._exit(errors.EXIT_STORAGE)
        return errors.EXIT_STORAGE
    except KeyboardInterrupt:
        print(f"meditron-jax {name}: interrupted", file=sys.stderr)
        return 130


def _traceback(debug: bool) -> None:
    if debug:
        import traceback
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
