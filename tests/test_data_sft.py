"""SFT data: the loss mask covers exactly the completion / assistant tokens, packing keeps the batch
format, resume is exact, malformed records are one clear error naming file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meditron_jax.data.config import DataConfig
from meditron_jax.data.loader import build_pipeline
from meditron_jax.data.sft import SFTDataError, encode_example, load_sft_file
from meditron_jax.data.tokenizer import Tokenizer
from tests.test_data_tokenizer import trained_tokenizer_path

CHAT = ("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(trained_tokenizer_path(), added_tokens=CHAT)


def _pc(i):
    return {"prompt": f"Question {i}: which drug treats hypertension? Options: aspirin, amlodipine. Answer:",
            "completion": ["amlodipine", "aspirin"][i % 2] + (" because it lowers blood pressure" * (i % 3))}


def test_prompt_completion_mask(tok):
    ex = _pc(4)
    arr = encode_example(ex, tok)
    inputs, targets, mask = arr[:, 0], arr[:, 1], arr[:, 2]
    prompt_ids, completion_ids = tok.encode(ex["prompt"]), tok.encode(ex["completion"])
    assert inputs.tolist() == [tok.bos_id] + prompt_ids + completion_ids
    assert targets.tolist() == prompt_ids + completion_ids + [tok.eos_id]
    assert targets[mask == 1].tolist() == completion_ids + [tok.eos_id]
    assert mask.tolist() == [0] * len(prompt_ids) + [1] * (len(completion_ids) + 1)


def test_messages_mask_covers_each_assistant_turn(tok):
    ex = {"messages": [{"role": "system", "content": "You are a careful clinician."},
                       {"role": "user", "content": "Dose of metformin?"},
                       {"role": "assistant", "content": "500 mg twice daily."},
                       {"role": "user", "content": "Side effects?"},
                       {"role": "assistant", "content": "Nausea."}]}
    arr = encode_example(ex, tok)
    targets, mask = arr[:, 1], arr[:, 2]
    im_end = tok.piece_to_id("<|im_end|>")
    expected = tok.encode("500 mg twice daily.") + [im_end] + tok.encode("Nausea.") + [im_end]
    assert targets[mask == 1].tolist() == expected
    assert (targets == tok.piece_to_id("<|im_start|>")).sum() == 5  # single ids, never in the loss
    assert mask[targets == tok.piece_to_id("<|im_start|>")].sum() == 0


@pytest.mark.parametrize("line, message", [
    ("{broken", r"sft\.jsonl:2: malformed JSON"),
    ('{"prompt": "q"}', r"sft\.jsonl:2: 'prompt' and 'completion' must both be strings"),
    ('{"prompt": "q", "completion": "  "}', r"sft\.jsonl:2: empty 'completion'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"sft\.jsonl:2: no non-empty assistant"),
    ('{"messages": [{"role": "doctor", "content": "hi"}]}', r"sft\.jsonl:2: message 0 needs 'role'"),
    ('{"question": "q"}', r"sft\.jsonl:2: needs 'prompt'\+'completion' or 'messages'"),
])
def test_bad_records(tmp_path, tok, line, message):
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps(_pc(0)) + "\n" + line + "\n")
    with pytest.raises(SFTDataError, match=message):
        load_sft_file(f, tok)


def test_sft_pipeline_batches_mask_exactly_the_completions(tmp_path, tok):
    f = tmp_path / "sft.jsonl"
    records = [_pc(i) for i in range(60)]
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    completions = {tuple(tok.encode(r["completion"]) + [tok.eos_id]) for r in records}
    cfg = DataConfig(sft_files=(str(f),), tokenizer=trained_tokenizer_path(), added_tokens=CHAT,
                     validation_fraction=0.1, prefetch_batches=1)
    seq, gb = 256, 4
    assert max(len(encode_example(r, tok)) for r in records) < seq
    p = build_pipeline(seq, gb, seed=0, config=cfg)
    assert p.mode == "sft"
    it = p.train_iterator()
    batches = [next(it) for _ in range(12)]
    seen = 0
    for b in batches:
        assert b["inputs"].shape == (gb, seq)
        seg, mask, tgt, inp = b["segment_ids"], b["loss_mask"], b["targets"], b["inputs"]
        assert mask[seg == 0].sum() == 0
        for r in range(gb):
            for s in np.unique(seg[r][seg[r] > 0]):
                sel = seg[r] == s
                assert inp[r][sel][0] == tok.bos_id  # first-fit packing never splits an example
                assert tuple(tgt[r][sel][mask[r][sel] == 1].tolist()) in completions
                seen += 1
    assert seen > 20
    # exact resume
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    it2 = build_pipeline(seq, gb, seed=0, config=cfg).train_iterator()
    it2.set_state(state)
    for x, y in zip(expected, [next(it2) for _ in range(4)]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    it.close(), it2.close()
    ev = p.eval_batches(10)
    assert ev and sum(float(b["loss_mask"].sum()) for b in ev) > 0


def test_long_examples_keep_their_end(tok):
    from meditron_jax.data.transforms import truncate

    ex = {"prompt": "history " * 200 + "Answer:", "completion": "amlodipine"}
    arr = encode_example(ex, tok)
    cut = truncate(arr, 64)
    assert len(cut) == 64 and cut[-1, 1] == tok.eos_id
    assert cut[:, 1][cut[:, 2] == 1].tolist() == tok.encode("amlodipine") + [tok.eos_id]


def test_missing_or_empty_sft_file_is_a_user_error(tmp_path):
    cfg = DataConfig(sft_files=(str(tmp_path / "nope.jsonl"),), tokenizer=trained_tokenizer_path())
    with pytest.raises(SFTDataError, match="nope.jsonl does not exist"):
        build_pipeline(64, 2, seed=0, config=cfg)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    cfg = DataConfig(sft_files=(str(tmp_path / "empty.jsonl"),), tokenizer=trained_tokenizer_path())
    with pytest.raises(SFTDataError, match="empty.jsonl has no examples"):
        build_pipeline(64, 2, seed=0, config=cfg)
