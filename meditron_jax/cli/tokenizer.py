"""`meditron-jax tokenizer train`: a small SentencePiece model for demos and tests
(`data.tokenizer`); users bring Llama-2's."""

from __future__ import annotations

from meditron_jax.data.tokenizer import Tokenizer, train_tokenizer
from meditron_jax.errors import UserError


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a BPE SentencePiece model with byte fallback (Llama-2 style)")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="plain text (one sentence per line) or JSONL (.jsonl/.jsonl.gz) files")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size of the model")
    t.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model")
    t.add_argument("--text-key", default=None, help="JSON key holding the text (forces JSONL parsing)")


def run(args) -> int:
    if args.action == "train":
        path = train_tokenizer(args.input, args.vocab_size, args.out, text_key=args.text_key)
        tok = Tokenizer(path)
        print(f"wrote {path} (vocab {tok.vocab_size}, fingerprint {tok.fingerprint[:12]})")
        return 0
    raise UserError(f"unknown tokenizer action {args.action!r}")
