"""Finding gin files: the configs shipped with the package, `--gin_search_path`, and includes.

Owns: the search order for `--gin_file F` and for `include 'F'` inside gin files:
    1. F itself (absolute, or relative to the current directory)
    2. each `--gin_search_path DIR`, in the order given
    3. the package directory, which holds `configs/` (shipped in the wheel), so
       `--gin_file configs/tiny.gin` and `include 'configs/mesh/single.gin'` work from anywhere
    4. the source checkout's root (when running from a checkout)
and `plain_file_reading()`: while our files are parsed, gin reads only plain files. Gin's
other reader treats `configs/mesh` as a Python package name: outside the repository it logged
a spurious "Path not found: configs/mesh/single.gin" error for every include, and when the
checkout is on PYTHONPATH (a `configs` namespace package) it crashed with a TypeError.
"""

from __future__ import annotations

import contextlib
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)


def search_paths(extra=()) -> list[str]:
    out = []
    for d in [*extra, os.getcwd(), PACKAGE_DIR, REPO_ROOT]:
        d = os.path.abspath(os.path.expanduser(str(d)))
        if d not in out:
            out.append(d)
    return out


def find(path: str, extra=()) -> str | None:
    """The file `path` names (see the search order above), or None."""
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        return path if os.path.isfile(path) else None
    for d in search_paths(extra):
        candidate = os.path.join(d, path)
        if os.path.isfile(candidate):
            return candidate
    return None


@contextlib.contextmanager
def plain_file_reading(extra=()):
    """gin's search prefixes set to `search_paths(extra)` and its readers to plain files only,
    for the duration of a parse (both restored after)."""
    from gin import config as gc

    readers, prefixes = list(gc._FILE_READERS), list(gc._LOCATION_PREFIXES)
    gc._FILE_READERS[:] = [(open, os.path.isfile)]
    gc._LOCATION_PREFIXES[:] = ["", *search_paths(extra)]
    try:
        yield
    finally:
        gc._FILE_READERS[:] = readers
        gc._LOCATION_PREFIXES[:] = prefixes


def shipped_configs() -> list[str]:
    """Names of the gin files shipped with the package (relative to its configs/)."""
    root = os.path.join(PACKAGE_DIR, "configs")
    if not os.path.isdir(root):
        root = os.path.join(REPO_ROOT, "configs")
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), os.path.dirname(root)) for f in files if f.endswith(".gin")]
    return sorted(out)
