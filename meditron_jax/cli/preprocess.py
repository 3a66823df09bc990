"""`meditron-jax preprocess`: JSONL text -> tokenized ArrayRecord shards + manifest
(`data.preprocess`)."""

from __future__ import annotations

from meditron_jax.data.preprocess import preprocess


def add_arguments(parser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSONL or JSONL.gz, one document per line")
    parser.add_argument("--tokenizer", required=True, metavar="FILE", help="SentencePiece tokenizer.model")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards and manifest.json")
    parser.add_argument("--text-key", default="text", help="JSON key holding the document text (default: text)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--added-tokens", nargs="*", default=(), metavar="TOKEN",
                        help="special tokens appended after the base vocabulary (Meditron's 17)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    m = preprocess(args.input, args.tokenizer, args.out, text_key=args.text_key, workers=args.workers,
                   added_tokens=tuple(args.added_tokens), overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {args.out}: {m['documents']} documents, {m['tokens']} tokens ({m['dtype']}), "
          f"{m['skipped_empty_documents']} empty skipped, {len(m['shards'])} shard(s)")
    return 0
