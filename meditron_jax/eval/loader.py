"""What `eval` and `generate` evaluate: a model from a checkpoint or HF dir, plus its tokenizer.

Owns: resolving the tokenizer (`--tokenizer`, else the one the checkpoint recorded, else an HF
dir's `tokenizer.model`), checking that tokenizer and model agree on the vocabulary, and the
shared command-line flags. Does not own: weight loading (`meditron_jax.from_pretrained`),
tokenization (`meditron_jax.data.tokenizer`).
"""

from __future__ import annotations

import os
import sys

from meditron_jax.errors import UserError


class LoadError(UserError, ValueError):
    """Checkpoint / tokenizer problems a user can fix (missing file, vocab mismatch)."""


def add_model_arguments(parser, tokenizer_required: bool = False):
    parser.add_argument("--checkpoint", required=True,
                        help="meditron-jax workdir / checkpoint dir, or a Hugging Face model dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece .model (default: the one the checkpoint recorded, or the HF dir's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the checkpoint's config)")


def recorded_tokenizer(checkpoint: str, step: int | None = None) -> tuple[str | None, str | None]:
    """(path, fingerprint) the checkpoint records, or (None, None)."""
    if os.path.isfile(os.path.join(checkpoint, "config.json")):  # Hugging Face directory
        path = os.path.join(checkpoint, "tokenizer.model")
        return (path if os.path.isfile(path) else None), None
    try:
        from meditron_jax.checkpoint import read_meta
    except ImportError:
        return None, None
    tok = read_meta(checkpoint, step).get("tokenizer") or {}
    if isinstance(tok, str):
        return tok, None
    return tok.get("path"), tok.get("fingerprint")


def load_tokenizer(path: str):
    from meditron_jax.data.tokenizer import Tokenizer

    if not os.path.isfile(path):
        raise LoadError(f"{path}: tokenizer file not found")
    return Tokenizer(path)


def resolve_tokenizer(checkpoint: str, tokenizer: str | None, step: int | None = None):
    rec_path, rec_fp = recorded_tokenizer(checkpoint, step)
    path = tokenizer or rec_path
    if path is None:
        raise LoadError(f"{checkpoint} records no tokenizer; pass --tokenizer FILE.model")
    if tokenizer is None and not os.path.isfile(path):
        raise LoadError(f"{checkpoint} records tokenizer {path}, which does not exist here; pass --tokenizer")
    tok = load_tokenizer(path)
    fp = getattr(tok, "fingerprint", None)
    if rec_fp and fp and rec_fp != fp:
        print(f"warning: tokenizer {path} (fingerprint {fp}) is not the one {checkpoint} was trained with "
              f"({rec_fp})", file=sys.stderr)
    return tok


def check_vocab(tokenizer, cfg, tokenizer_name: str = "tokenizer"):
    if tokenizer.vocab_size != cfg.vocab_size:
        raise LoadError(f"{tokenizer_name} has {tokenizer.vocab_size} tokens but the checkpoint's vocab is "
                        f"{cfg.vocab_size}; pass the tokenizer the model was trained with")


def load(args):
    """(model, tokenizer) from parsed `add_model_arguments` flags; vocab checked."""
    from meditron_jax import from_pretrained

    if not os.path.exists(args.checkpoint):
        raise LoadError(f"{args.checkpoint}: no such checkpoint or model directory")
    tok = resolve_tokenizer(args.checkpoint, args.tokenizer, args.step)
    model = from_pretrained(args.checkpoint, dtype=args.dtype, step=args.step)
    check_vocab(tok, model.cfg, args.tokenizer or "the recorded tokenizer")
    return model, tok
