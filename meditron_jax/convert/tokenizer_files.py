"""Hugging Face tokenizer files for a SentencePiece (Llama-2 style) tokenizer plus added tokens.

Owns: writing `tokenizer.model`, `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` and `added_tokens.json` next to exported weights, such that
`transformers.AutoTokenizer.from_pretrained(dir)` gives the same ids as SentencePiece (and as
`meditron_jax.data.tokenizer.Tokenizer`, added tokens included).

Why a hand-written `tokenizer.json` with the generic fast-tokenizer class: transformers 5's
`LlamaTokenizer` rebuilds its pipeline from `tokenizer.model` with a Metaspace pre-tokenizer
that does not add SentencePiece's dummy "▁" prefix to text that already starts with a space
(e.g. " b" after an added token), so ids differ from SentencePiece there. The pipeline of
Meta's own Llama-2 `tokenizer.json` (normalizer: prepend "▁", spaces -> "▁"; BPE with byte
fallback; BOS added) matches SentencePiece exactly, and `PreTrainedTokenizerFast` loads it
as written. BPE merges are derived from the piece scores as transformers' SentencePiece
converter does. Does not own: loading / training tokenizers (`data/tokenizer.py`).
"""

from __future__ import annotations

import json
import os
import shutil

from meditron_jax.errors import UserError


def _special(id_: int, content: str) -> dict:
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _merges(sp) -> list[list[str]]:
    """BPE merges ranked like SentencePiece's BPE: by the score of the merged piece."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    merges = []
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        score = sp.get_score(i)
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [[a, b] for a, b, _ in merges]


def write_tokenizer_files(path: str, added: list[str], vocab_size: int, max_length: int, out: str) -> None:
    from meditron_jax.data.tokenizer import Tokenizer

    tok = Tokenizer(path, added)
    if tok.vocab_size > vocab_size:
        raise UserError(f"tokenizer {path} has {tok.base_vocab_size} pieces + {len(added)} added tokens "
                        f"= {tok.vocab_size}, more than the model's vocab size {vocab_size}")
    sp = tok.sp
    specials = [(i, sp.id_to_piece(i)) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()) if i >= 0]
    added_entries = [_special(i, p) for i, p in specials]
    added_entries += [_special(tok.base_vocab_size + k, t) for k, t in enumerate(added)]
    bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added_entries,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": None if bos is None else {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None,
                  "unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": {sp.id_to_piece(i): i for i in range(sp.vocab_size())},
                  "merges": _merges(sp)},
    }
    names = {"unk_token": sp.unk_id(), "bos_token": sp.bos_id(), "eos_token": sp.eos_id()}
    special_map = {k: sp.id_to_piece(i) for k, i in names.items() if i >= 0}
    if added:
        special_map["additional_special_tokens"] = list(added)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": max_length, "pad_token": None,
              "added_tokens_decoder": {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in added_entries},
              **special_map}
    shutil.copyfile(path, os.path.join(out, "tokenizer.model"))
    _write_json(os.path.join(out, "tokenizer.json"), tokenizer_json, indent=None)
    _write_json(os.path.join(out, "tokenizer_config.json"), config)
    _write_json(os.path.join(out, "special_tokens_map.json"), special_map)
    if added:
        _write_json(os.path.join(out, "added_tokens.json"), {t: tok.base_vocab_size + k for k, t in enumerate(added)})


def _write_json(path: str, obj, indent: int | None = 2) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
