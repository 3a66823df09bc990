"""JSONL reading for every format of the package: pretraining text, SFT records, exam files, prompts.

Owns: opening a JSONL file (plain or .gz), reading it in newline-aligned byte chunks (a pool of
workers can parse chunks independently: `preprocess`), decoding UTF-8 and JSON line by line with
one-line `UserError`s that name the file and the line, and skipping blank lines (they are not
records). The caller picks the error type (its command's) and how a line is named: `path:N`
(`colon`, compiler style: preprocess, tokenizer, SFT files) or `path line N` (`words`: exam
files, whose other records are named `PMID n` / `row n` / `record n` the same way).

Does not own: what a record must hold (each format's reader checks its own keys), except the one
shape shared by pretraining text and the tokenizer trainer: `{text_key: str}` (`parse_text_chunk`).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from meditron_jax.errors import UserError

CHUNK_BYTES = 1 << 20  # work unit sent to a preprocess worker (newline aligned)


class JsonlError(UserError, ValueError):
    """A JSONL file that cannot be read, is not UTF-8, or has a line that is not JSON."""


def colon(path: str, line: int) -> str:
    return f"{path}:{line}"


def words(path: str, line: int) -> str:
    return f"{path} line {line}"


Where = Callable[[str, int], str]


def open_binary(path: str, error: type[UserError] = JsonlError):
    if not os.path.isfile(path):
        raise error(f"input file {path} does not exist")
    try:
        if path.endswith(".gz"):
            f = gzip.open(path, "rb")
            f.peek(1)  # raises on a file that is not gzip
            return f
        return open(path, "rb")
    except (OSError, gzip.BadGzipFile) as e:
        raise error(f"cannot read {path}: {e}") from None


def read_chunks(path: str, chunk_bytes: int = CHUNK_BYTES, error: type[UserError] = JsonlError
                ) -> Iterator[tuple[str, int, bytes]]:
    """Yields (path, first_line_number, bytes) pieces of a file, each ending on a line boundary."""
    line_no = 1
    rest = b""
    with open_binary(path, error) as f:
        while True:
            try:
                block = f.read(chunk_bytes)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise error(f"cannot read {path}: {e}") from None
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest = block
                continue
            chunk, rest = block[:cut], block[cut:]
            yield path, line_no, chunk
            line_no += chunk.count(b"\n")
    if rest:
        yield path, line_no, rest


def chunk_records(path: str, first_line: int, chunk: bytes, *, error: type[UserError] = JsonlError,
                  where: Where = colon, malformed: str = "malformed JSON", objects: bool = False
                  ) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) for each non-blank line of one chunk; `objects` refuses a line
    that is JSON but not an object."""
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + chunk.count(b"\n", 0, e.start)
        raise error(f"{where(path, line)}: not valid UTF-8 ({e.reason})") from None
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue  # blank lines are not records
        n = first_line + i
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where(path, n)}: {malformed} ({e.msg})") from None
        if objects and not isinstance(value, dict):
            raise error(f"{where(path, n)}: expected a JSON object, got {type(value).__name__}")
        yield n, value


def read_jsonl(path: str, *, error: type[UserError] = JsonlError, where: Where = colon,
               malformed: str = "malformed JSON", objects: bool = False, chunk_bytes: int = CHUNK_BYTES
               ) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) for each non-blank line of a JSONL file (plain or .gz), in order."""
    for p, first, chunk in read_chunks(str(path), chunk_bytes, error):
        yield from chunk_records(p, first, chunk, error=error, where=where, malformed=malformed, objects=objects)


def parse_text_chunk(path: str, first_line: int, chunk: bytes, text_key: str,
                     error: type[UserError] = JsonlError) -> tuple[list[str], int]:
    """Returns (non-empty texts in order, number of empty documents) for one chunk of `{text_key: str}` lines."""
    texts: list[str] = []
    empty = 0
    for n, obj in chunk_records(path, first_line, chunk, error=error):
        if not isinstance(obj, dict) or text_key not in obj:
            raise error(f"{path}:{n}: no {text_key!r} key (use --text-key)")
        value = obj[text_key]
        if not isinstance(value, str):
            raise error(f"{path}:{n}: {text_key!r} is {type(value).__name__}, not a string")
        if value.strip():
            texts.append(value)
        else:
            empty += 1
    return texts, empty


def iter_texts(path: str, text_key: str = "text", error: type[UserError] = JsonlError) -> Iterator[str]:
    """The text of each non-empty document of a JSONL file, in order (errors name file and line)."""
    for p, first, chunk in read_chunks(str(path), error=error):
        texts, _ = parse_text_chunk(p, first, chunk, text_key, error)
        yield from texts
