"""`meditron-jax lm-eval ...`: lm-evaluation-harness's own command line with the `meditron-jax`
model type registered (lm-eval 0.4.13 reads no plugin entry points for models).

Every argument goes to lm-eval unchanged, e.g.
    meditron-jax lm-eval --model meditron-jax --model_args checkpoint=DIR,mesh=tensor=8 --tasks T
"""

from __future__ import annotations

import argparse
import sys

from meditron_jax.errors import UserError


def add_arguments(parser):
    # lm-eval parses its own flags: hand it everything (argparse's REMAINDER refuses a leading --flag)
    parser.parse_args = lambda argv=None, namespace=None: argparse.Namespace(
        lm_eval_args=list(sys.argv[2:] if argv is None else argv))


def run(args) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("lm-eval is not installed; pip install 'meditron-jax[eval]'") from None
    import meditron_jax.eval.lm_eval_backend  # noqa: F401  (registers the model type)
    from lm_eval.__main__ import cli_evaluate

    argv = [a for a in args.lm_eval_args]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:  # lm-eval exits through argparse / sys.exit
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    finally:
        sys.argv = old
    return 0
