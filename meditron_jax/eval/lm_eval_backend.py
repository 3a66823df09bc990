"""lm-evaluation-harness model type `meditron-jax`: any lm-eval task on our (sharded) JAX model.

Owns: the `TemplateLM` subclass (`loglikelihood` through lm-eval's own context/continuation
encoding, `loglikelihood_rolling` through its rolling windows, `generate_until` on our KV-cache
generator), its model_args, and `meditron-jax lm-eval ...`, which registers the model type and
runs lm-eval's own command line. Does not own: scoring (`scoring.Scorer`: batched, length-bucketed,
one compiled shape per bucket, the shared-context prefix cache), generation (`generate.py`),
the mesh (`distributed.py`).

Use (the `eval` extra installs lm-eval):
    meditron-jax lm-eval --model meditron-jax \\
        --model_args checkpoint=WORKDIR,mesh=data=2+tensor=4,batch_size=16 --tasks T
or from Python, after `import meditron_jax.eval.lm_eval_backend`,
    lm_eval.simple_evaluate(model="meditron-jax", model_args="checkpoint=DIR", tasks=[...]).
lm-eval 0.4.13 finds model types only in its registry (it reads no plugin entry points), so the
plain `lm_eval --model meditron-jax` cannot see ours; `meditron-jax lm-eval` is that same
command line with the model registered first.

model_args: checkpoint (workdir, checkpoint or HF dir; required), step, tokenizer, dtype,
mesh (axes joined by '+': `tensor=8`, `data=2+tensor=4`; commas separate model_args),
device_memory (GiB), max_length (default: the model's context), max_gen_toks (256),
batch_size (lm-eval's --batch_size also lands here; "auto" means 8).

Tokenization is the checkpoint's SentencePiece tokenizer, with BOS, exactly as lm-eval's `hf`
backend encodes Llama (whole string encoded, context split off; empty contexts take BOS).
"""

from __future__ import annotations

import sys
import types

import lm_eval.models  # noqa: F401  (lm-eval's own types first: it loads them only into an empty registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from meditron_jax.errors import UserError


class LmEvalArgsError(UserError, ValueError):
    """Bad --model_args for the meditron-jax model type."""


@register_model("meditron-jax")
class MeditronJaxLM(TemplateLM):
    def __init__(self, checkpoint: str | None = None, step: int | None = None, tokenizer: str | None = None,
                 dtype: str | None = None, mesh: str | None = None, device_memory: float | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, batch_size=8, max_batch_size=None,
                 device=None, **unknown):
        super().__init__()
        if unknown:
            raise LmEvalArgsError(f"meditron-jax model_args: unknown {sorted(unknown)}; known: checkpoint, step, "
                                  "tokenizer, dtype, mesh, device_memory, max_length, max_gen_toks, batch_size")
        if not checkpoint:
            raise LmEvalArgsError("meditron-jax model_args: checkpoint=DIR is required")
        from meditron_jax.eval import loader

        bs = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        args = types.SimpleNamespace(checkpoint=str(checkpoint), step=step, tokenizer=tokenizer, dtype=dtype,
                                     mesh=str(mesh).replace("+", ",") if mesh else None, gin_file=[], gin_param=[],
                                     device_memory=device_memory)
        self.model, self.tok, self.place = loader.load_for_inference(args, batch=bs, cache_len=-1, what="lm-eval")
        self._max_length = int(max_length or self.model.cfg.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = bs
        self._scorer = None
        self._generator = None

    # -- what TemplateLM needs ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "meditron-jax-sentencepiece"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = add_special_tokens is not False  # None: BOS, as the hf backend's Llama tokenizer adds it
        if bos and string.startswith("<s>"):
            string, bos = string[len("<s>"):], True
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, tokens) -> str:
        """Text of generated ids as Llama's Hugging Face tokenizer decodes them (what the `hf`
        backend returns): '▁' -> ' ', a run of byte pieces decoded as UTF-8 or else one U+FFFD per
        byte, the first leading space dropped, control tokens (BOS/EOS) skipped. SentencePiece's
        own decode differs only on invalid byte runs (it keeps their valid bytes)."""
        out, run = [], []

        def flush():
            if run:
                try:
                    out.append(bytes(run).decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(run))
                run.clear()

        for i in map(int, tokens):
            if i < self.tok.base_vocab_size and self.tok.sp.is_control(i):
                continue
            piece = self.tok.id_to_piece(i)
            if i < self.tok.base_vocab_size and self.tok.sp.is_byte(i):
                run.append(int(piece[3:-1], 16))  # <0xNN>
                continue
            flush()
            out.append(piece.replace("\u2581", " ") if i < self.tok.base_vocab_size else piece)
        flush()
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text

    @property
    def scorer(self):
        if self._scorer is None:
            from meditron_jax.eval.scoring import Scorer
            self._scorer = Scorer(self.model, batch_size=self.batch_size, placement=self.place)
        return self._scorer

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of continuation log-probs, whether every continuation token is the argmax)."""
        from meditron_jax.eval.scoring import Row

        rows, groups = [], []
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]  # left-truncate as the hf backend does
            inp = whole[:-1]
            n = len(inp)
            rows.append(Row(inp, list(range(n - len(cont), n)), [[t] for t in cont]))
            groups.append(tuple(inp[: n - len(cont) + 1]))  # same context: its KV cache is computed once
        results = self.scorer(rows, progress=not disable_tqdm, desc="meditron-jax loglikelihood", groups=groups)
        out = []
        for (_, _, cont), (logp, top) in zip(requests, results):
            out.append((float(logp[:, 0].sum()), bool(all(int(t) == c for t, c in zip(top, cont)))))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, pred in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), ctx, pred))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (s, _) in zip(owner, scores):
            totals[i] += s
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from meditron_jax.eval.generate import Generator, Sampling

        if self._generator is None:
            self._generator = Generator(self.model, placement=self.place)
        out = [None] * len(requests)
        by_kwargs: dict = {}
        for i, req in enumerate(requests):
            ctx, kw = req.args
            by_kwargs.setdefault(repr(sorted((kw or {}).items())), (kw or {}, []))[1].append((i, ctx))
        for kw, items in by_kwargs.values():
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temp = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample", False) else 0.0
            sampling = Sampling(temperature=temp, top_k=int(kw.get("top_k", 0) or 0),
                                top_p=float(kw.get("top_p", 1.0) or 1.0))
            budget = self.max_length - max_new
            if budget < 1:
                raise LmEvalArgsError(f"max_gen_toks {max_new} leaves no room in the context of {self.max_length}")
            prompts = [self.tok_encode(ctx)[-budget:] for _, ctx in items]
            gens = self._generator.generate(prompts, max_new, sampling, seed=int(kw.get("seed", 0) or 0),
                                            eos_id=self.eot_token_id, batch_size=self.batch_size)
            for (i, _), ids in zip(items, gens):
                text = self.tok_decode([t for t in ids if t != self.eot_token_id])
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop, 1)[0]
                out[i] = text
        return out
