"""`meditron-jax generate`: sample text from a checkpoint or HF directory with a KV cache
(`eval.generate`), greedy or sampled, streamed when there is one prompt."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax

from meditron_jax.eval import loader
from meditron_jax.eval.generate import GenerateError, Generator, Sampling, Streamer, read_prompts


def add_arguments(parser):
    loader.add_model_arguments(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-file", help="one prompt per line, or JSONL with a 'prompt' key (.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off, default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off, default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    parser.add_argument("--no-eos-stop", action="store_true", help="keep generating past EOS")
    parser.add_argument("--out", default=None, help="also write {prompt, completion, tokens} JSONL here")


def run(args) -> int:
    prompts = args.prompt if args.prompt else read_prompts(args.prompt_file)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise GenerateError(f"{args.out}: directory {os.path.dirname(os.path.abspath(args.out))} does not exist")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    model, tok, placement = loader.load_for_inference(args, batch=args.batch_size, seq_len=32,
                                                      cache_len=-1, what="generate")
    if tok.vocab_size < model.cfg.vocab_size:
        sampling = dataclasses.replace(sampling, vocab_limit=tok.vocab_size)
    ids = [tok.encode(p, bos=True) for p in prompts]
    gen = Generator(model, placement=placement)
    eos = None if args.no_eos_stop else tok.eos_id
    streamer = None
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
        streamer = Streamer(tok, ids[0], sys.stdout)
    outs = gen.generate(ids, args.max_new_tokens, sampling, seed=args.seed, eos_id=eos,
                        batch_size=min(args.batch_size, len(ids)), on_tokens=streamer)
    completions = [tok.decode(p + [t for t in o if t != tok.eos_id])[len(tok.decode(p)):]
                   for p, o in zip(ids, outs)]
    if streamer is not None:
        sys.stdout.write(completions[0][streamer.printed:] + "\n")
    else:
        for i, (p, c) in enumerate(zip(prompts, completions)):
            print(f"=== {i} ===\n{p}{c}")
    if args.out and jax.process_index() == 0:  # multi-host: every process has the same completions
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for p, c, o in zip(prompts, completions, outs):
                f.write(json.dumps({"prompt": p, "completion": c, "tokens": o}) + "\n")
        os.replace(tmp, args.out)
    return 0
