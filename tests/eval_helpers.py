"""Tiny exam files, a tiny tokenizer and a tiny Hugging Face model for the eval/generate tests."""

import json
import os
import random

from meditron_jax.models.config import LlamaConfig
from meditron_jax.data.tokenizer import train_tokenizer

WORDS = ("patient fever cough aspirin insulin heart lung kidney liver blood pressure dose drug therapy "
         "trial study cells mice tumor risk outcome sepsis asthma diabetes cancer children women").split()


def corpus_lines(n=1500, seed=0):
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        lab = rng.choice("ABCDE") if i % 2 else rng.choice(["yes", "no", "maybe"])
        lines.append(f"Question: {words}?")
        lines.append(f"{rng.choice('ABCDE')}. {words}")
        lines.append(f"The answer is: {lab}")
    return lines


def train_tiny_tokenizer(directory, vocab_size=600):
    """A BPE tokenizer whose pieces include ▁A..▁E, ▁yes, ▁no, ▁maybe (distinct label first tokens)."""
    text = os.path.join(directory, "corpus.txt")
    with open(text, "w") as f:
        f.write("\n".join(corpus_lines()) + "\n")
    return train_tokenizer([text], vocab_size, os.path.join(directory, "tiny"))


def tiny_config(vocab_size, **kw):
    base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, max_position_embeddings=512)
    base.update(kw)
    return LlamaConfig(**base)


def item_texts(i, rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10 + i % 7)))


def write_pubmedqa(path, n=8, seed=0):
    rng = random.Random(seed)
    labels = ["yes", "no", "maybe"]
    data = {}
    for i in range(n):
        pmid = str(1000 + i)
        data[pmid] = {"QUESTION": f"Does {item_texts(i, rng)} help?",
                      "CONTEXTS": [item_texts(i, rng) + ".", item_texts(i + 1, rng) + "."],
                      "LABELS": ["BACKGROUND", "RESULTS"], "final_decision": labels[i % 3],
                      "LONG_ANSWER": "x"}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return data


def write_medmcqa(path, n=8, seed=0, base=1):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            rec = {"question": f"Which {item_texts(i, rng)}?", "opa": item_texts(1, rng), "opb": item_texts(2, rng),
                   "opc": item_texts(3, rng), "opd": item_texts(4, rng), "cop": i % 4 + base,
                   "id": f"m{i}", "subject_name": "Physiology", "exp": None}
            f.write(json.dumps(rec) + "\n")


def write_medqa(path, n=8, seed=0, n_options=5):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            opts = {"ABCDE"[j]: item_texts(j, rng) for j in range(n_options)}
            rec = {"question": f"A patient with {item_texts(i, rng)}. What next?", "options": opts,
                   "answer_idx": "ABCDE"[i % n_options], "answer": opts["ABCDE"[i % n_options]], "meta_info": "step1"}
            f.write(json.dumps(rec) + "\n")


def write_mmlu(path, n=6, seed=0, header=False):
    import csv
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["question", "A", "B", "C", "D", "answer"])
        for i in range(n):
            w.writerow([f"What is {item_texts(i, rng)}, really?", *(item_texts(j, rng) for j in range(4)), "ABCD"[i % 4]])
