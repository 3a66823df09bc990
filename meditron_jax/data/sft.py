"""Supervised fine-tuning data: JSONL prompt/completion pairs and chat `messages` -> masked examples.

Owns: reading SFT JSONL files (errors name the file and line), rendering chat messages, and
tokenizing each example into an int32 array [n, 3] of (input id, target id, loss flag) where the
loss flag is 1 exactly where the target is a completion / assistant token (plus the EOS or
end-of-turn that closes it) and 0 on the prompt, so the model is trained only on answers.

Two record forms, one per line:
  {"prompt": "...", "completion": "..."}          -> BOS prompt completion EOS
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
      -> BOS, then per message `<|im_start|>{role}\\n{content}<|im_end|>\\n` (ChatML); the loss covers
         each assistant `content<|im_end|>`. Add `<|im_start|>`/`<|im_end|>` as added tokens
         (`data.added_tokens`) to make them single ids; otherwise they are encoded as text.
Prompt and completion are encoded separately (SentencePiece puts its word-boundary marker in
front of the completion), so "Answer:" + "B" reads as "Answer: B", the way the exam harness
scores answers.

Does not own: packing and batching (`data.loader`, first-fit packing into the same batch format
as pretraining), turning exam sets into SFT files (`meditron-jax data mcq-to-sft`, `eval.to_sft`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from meditron_jax.data import jsonl
from meditron_jax.data.tokenizer import Tokenizer
from meditron_jax.errors import UserError

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class SFTDataError(UserError):
    """A malformed SFT JSONL file or record."""


def _pieces_prompt_completion(obj: dict, where: str) -> list[tuple[str, bool]]:
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise SFTDataError(f"{where}: 'prompt' and 'completion' must both be strings")
    if not completion.strip():
        raise SFTDataError(f"{where}: empty 'completion'")
    return [(prompt, False), (completion, True)]


def _pieces_messages(obj: dict, where: str) -> list[tuple[str, bool]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise SFTDataError(f"{where}: 'messages' must be a non-empty list")
    pieces: list[tuple[str, bool]] = []
    has_answer = False
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SFTDataError(f"{where}: message {k} needs 'role' in {list(ROLES)} and a string 'content'")
        assistant = m["role"] == "assistant"
        has_answer |= assistant and bool(m["content"].strip())
        pieces.append((f"{IM_START}{m['role']}\n", False))
        pieces.append((m["content"], assistant))
        pieces.append((IM_END, assistant))
        pieces.append(("\n", False))
    if not has_answer:
        raise SFTDataError(f"{where}: no non-empty assistant message to train on")
    return pieces


def encode_example(obj: dict, tok: Tokenizer, where: str = "example") -> np.ndarray:
    """One record -> int32 [n, 3] columns (inputs, targets, loss_mask); n = tokens - 1."""
    if not isinstance(obj, dict):
        raise SFTDataError(f"{where}: expected a JSON object")
    if "messages" in obj:
        pieces = _pieces_messages(obj, where)
        eos_in_loss = False  # the final <|im_end|> closes the answer
    elif "prompt" in obj or "completion" in obj:
        pieces = _pieces_prompt_completion(obj, where)
        eos_in_loss = True
    else:
        raise SFTDataError(f"{where}: needs 'prompt'+'completion' or 'messages'")
    ids = [tok.bos_id]
    flags = [0]
    for text, in_loss in pieces:
        if not text:
            continue
        piece_ids = tok.encode(text)
        ids.extend(piece_ids)
        flags.extend([int(in_loss)] * len(piece_ids))
    ids.append(tok.eos_id)
    flags.append(int(eos_in_loss))
    ids_a = np.asarray(ids, dtype=np.int32)
    out = np.empty((len(ids) - 1, 3), dtype=np.int32)
    out[:, 0] = ids_a[:-1]
    out[:, 1] = ids_a[1:]
    out[:, 2] = np.asarray(flags[1:], dtype=np.int32)
    return out


def load_sft_file(path: str | os.PathLike, tok: Tokenizer) -> list[np.ndarray]:
    path = str(path)
    if not os.path.isfile(path):
        raise SFTDataError(f"SFT file {path} does not exist")
    examples = [encode_example(obj, tok, jsonl.colon(path, n)) for n, obj in jsonl.read_jsonl(path, error=SFTDataError)]
    if not examples:
        raise SFTDataError(f"SFT file {path} has no examples")
    return examples


def load_sft_files(paths: Sequence[str | os.PathLike], tok: Tokenizer) -> list[np.ndarray]:
    """All examples of all files, in file order then line order."""
    if not paths:
        raise SFTDataError("data.sft_files is empty")
    out: list[np.ndarray] = []
    for p in paths:
        out.extend(load_sft_file(p, tok))
    return out
