"""The command lines. `meditron-jax SUBCOMMAND ...` is this thin dispatcher (`main`); each
subcommand is one module of this package (`cli/train.py`, `cli/export.py`, ...) with
`add_arguments(parser)` and `run(args) -> int`, which parses flags, calls the package that owns
the work and prints the result. Only the chosen module is imported. Owns no training, planning,
conversion or evaluation logic. User errors (`meditron_jax.errors.UserError`) become one line on stderr
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
    "train": ("meditron_jax.cli.train", "continued pretraining / fine-tuning from gin files"),
    "import": ("meditron_jax.cli.import_weights", "Llama-2 weights (Hugging Face or Meta) -> step-0 checkpoint"),
    "export": ("meditron_jax.cli.export", "checkpoint -> Hugging Face safetensors or Meta consolidated.pth"),
    "preprocess": ("meditron_jax.cli.preprocess", "JSONL text -> tokenized ArrayRecord shards + manifest"),
    "tokenizer": ("meditron_jax.cli.tokenizer", "train a small SentencePiece tokenizer (demos, tests)"),
    "data": ("meditron_jax.cli.data", "data utilities (mcq-to-sft)"),
    "eval": ("meditron_jax.cli.eval", "perplexity and k-shot medical multiple-choice exams"),
    "generate": ("meditron_jax.cli.generate", "sample text with a KV cache"),
    "lm-eval": ("meditron_jax.cli.lm_eval", "lm-evaluation-harness with the meditron-jax model type"),
    "plan": ("meditron_jax.cli.plan", "compile the train step ahead of time and report memory / FLOPs"),
    "config": ("meditron_jax.cli.config", "print the operative gin config with its defaults (no data, no compile)"),
    "checkpoints": ("meditron_jax.cli.checkpoints", "list a workdir's checkpoints: step, time, size, loss"),
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
    from meditron_jax import errors

    previous = os.environ.get(errors.DEBUG_ENV)
    if debug:  # the plugins' own start-up lines too (console.quiet_native_stderr), for this call only
        os.environ[errors.DEBUG_ENV] = "1"
    try:
        return _run(name, argv[1:], debug or errors.debug_enabled())
    finally:
        if debug and previous is None:
            os.environ.pop(errors.DEBUG_ENV, None)
        elif debug:
            os.environ[errors.DEBUG_ENV] = previous


def _run(name: str, argv: list[str], debug: bool) -> int:
    from meditron_jax import console, errors
    from meditron_jax.distributed import environment
    from meditron_jax.errors import UserError
    from meditron_jax.training import hostmem

    try:
        hostmem.apply(cpu=environment.cpu_only())  # before JAX starts its threads (hostmem.py)
    except UserError as e:
        print(f"meditron-jax {name}: error: {e}", file=sys.stderr)
        return errors.EXIT_USER
    console.import_jax_quietly()  # the compile-only CUDA plugin's "no driver" notices (plan extra)
    # No GPU or TPU here and JAX_PLATFORMS unset: the CPU, so the CUDA / TPU plugins of an installed
    # extra never start (their start-up errors are a traceback). --debug leaves the choice to JAX.
    platform = None if debug else environment.default_platform()
    if platform:
        import jax
        jax.config.update("jax_platforms", platform)
    console.setup()  # one timestamped line format for every subcommand; no absl/Orbax chatter
    if not debug:  # the one line below says it; Orbax's threads would log the same fault with tracebacks
        errors.quiet_fault_logs()

    try:
        args = build_parser(name).parse_args(argv)
        return int(importlib.import_module(SUBCOMMANDS[name][0]).run(args) or 0)
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
