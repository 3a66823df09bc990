"""The one JSONL reader (data.jsonl): line numbers across chunks and .gz, and the same one-line
errors in every format that uses it; the data layer imports no evaluation code."""

import ast
import gzip
import pathlib

import pytest

from meditron_jax.data import jsonl
from meditron_jax.errors import UserError

PKG = pathlib.Path(__file__).resolve().parents[1] / "meditron_jax"


@pytest.mark.parametrize("gz", [False, True])
def test_line_numbers_survive_chunks_and_blank_lines(tmp_path, gz):
    lines = [b'{"a": 1}', b"", b'{"a": 2}', b"   ", b'{"a": 3}'] * 40
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / ("x.jsonl.gz" if gz else "x.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    got = list(jsonl.read_jsonl(str(path), chunk_bytes=7))  # chunks far shorter than a line
    want = [(n, {"a": int(line[6:7])}) for n, line in enumerate(lines, 1) if line.strip()]
    assert got == want


def test_last_line_without_newline_and_bad_line_number(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n' * 30 + b'{"a": 2}\n{"a": ')
    with pytest.raises(jsonl.JsonlError, match=r"x\.jsonl:62: malformed JSON"):
        list(jsonl.read_jsonl(str(path), chunk_bytes=16))


def _medqa(p):
    from meditron_jax.eval.tasks import read_medqa
    return read_medqa(p)


def _prompts(p):
    from meditron_jax.eval.generate import read_prompts
    return read_prompts(p)


def _truthfulqa(p):
    from meditron_jax.eval.truthfulqa import read_json
    return read_json(p)


@pytest.mark.parametrize("reader", [_medqa, _prompts, _truthfulqa])
@pytest.mark.parametrize("line2, message", [(b'{"question": \n', r"line 2: .*\("),
                                            (b'{"prompt": "caf\xe9"}\n', r"line 2: not valid UTF-8")])
def test_exam_and_prompt_files_name_the_line(tmp_path, reader, line2, message):
    path = tmp_path / "f.jsonl"
    first = b'{"prompt": "ok", "question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}\n'
    path.write_bytes(first + line2)  # line 1 is valid for all three readers
    with pytest.raises(UserError, match=r"f\.jsonl " + message) as e:
        reader(str(path))
    assert "\n" not in str(e.value)


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_dependency_arrows_point_one_way():
    for f in sorted((PKG / "data").glob("*.py")):  # function-level imports count too
        assert not any(n.startswith("meditron_jax.eval") for n in _imports(f)), f"{f.name} imports eval"
    tokenizer = _imports(PKG / "data" / "tokenizer.py")
    assert not any(n.startswith("meditron_jax.data.preprocess") for n in tokenizer)
    assert not any(n.startswith("meditron_jax.data.preprocess") for n in _imports(PKG / "data" / "jsonl.py"))
