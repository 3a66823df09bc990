"""`meditron-jax export CKPT --to hf|meta --out DIR`: a checkpoint -> Hugging Face safetensors or
Meta consolidated.pth (`convert.exporter`)."""

from __future__ import annotations

import json
import os

from meditron_jax.convert.exporter import DTYPES, SOURCE_FILE, export


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a workdir, its checkpoints/ directory, or one step directory")
    parser.add_argument("--step", type=int, default=None, help="step to export (default: the latest)")
    parser.add_argument("--to", dest="target", choices=("hf", "meta"), required=True,
                        help="hf: Hugging Face safetensors dir; meta: params.json + consolidated.00.pth")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="tensor dtype of the export (default bfloat16)")
    parser.add_argument("--max-shard-size", default="5GB", help="Hugging Face shard size limit, e.g. 5GB, 500MB")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece tokenizer.model to export with --to hf "
                             "(default: the one the checkpoint records, if that file exists)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="write no tokenizer files, even when the checkpoint records a tokenizer")
    parser.add_argument("--added-tokens", nargs="*", default=None,
                        help="tokens appended after the SentencePiece vocab (ids base, base+1, ...), "
                             "or one .json file holding a list of them")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    out = export(args.checkpoint, args.target, args.out, step=args.step, dtype=args.dtype,
                 max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                 added_tokens=args.added_tokens, overwrite=args.overwrite,
                 use_recorded_tokenizer=not args.no_tokenizer)
    with open(os.path.join(out, SOURCE_FILE)) as f:
        src = json.load(f)
    print(f"exported step {src['step']} of {src['checkpoint']} to {out}")
    return 0
