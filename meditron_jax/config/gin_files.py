"""Finding gin files: the configs shipped with the package, `--gin_search_path`, and includes.

Owns: the search order for `--gin_file F` and for `include 'F'` inside gin files:
    1. F itself (absolute, or relative to the current directory)
    2. each `--gin_search_path DIR`, in the order given
    3. the package directory, which holds `configs/` (shipped in the wheel), so
       `--gin_file configs/tiny.gin` and `include 'configs/mesh/single.gin'` work from anywhere
    4. the source checkout's root (when running from a checkout)
`parse` (a run's `--gin_file` / `--gin_param`, T5X style, `import` statements in gin files
refused, every bound value checked by `config.checks`; the configurables are registered by the
caller: `training.config.parse_gin` imports them all), and
`plain_file_reading()`: while our files are parsed, gin reads only plain files. Gin's
other reader treats `configs/mesh` as a Python package name: outside the repository it logged
a spurious "Path not found: configs/mesh/single.gin" error for every include, and when the
checkout is on PYTHONPATH (a `configs` namespace package) it crashed with a TypeError.
"""

from __future__ import annotations

import contextlib
import os

from meditron_jax.errors import UserError

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # meditron_jax/ (holds configs/)
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


# ---- parsing a run's gin files ---------------------------------------------------------------

def parse(gin_files, gin_params, search_path=()):
    """Parses (and checks, `config.checks`) the gin files and bindings; files are found through
    `find` (cwd, `--gin_search_path`, the configs shipped with the package). The configurables
    they bind must be registered (imported) first."""
    import tokenize

    import gin

    from meditron_jax.config import checks

    gin.clear_config()
    resolved = []
    for f in gin_files:
        full = find(f, search_path)
        if full is None:
            raise UserError(f"gin file not found: {f} (searched {', '.join(search_paths(search_path))}; "
                            "add a directory with --gin_search_path)")
        resolved.append(full)
    try:
        with plain_file_reading(search_path):
            for f in resolved:
                refuse_gin_imports(f, search=search_path)
            gin.parse_config_files_and_bindings(resolved, list(gin_params), skip_unknown=False)
    except (ValueError, KeyError, TypeError, SyntaxError, IOError, tokenize.TokenError) as e:
        raise UserError(f"gin: {checks.explain_parse_error(str(e), gin_params)}") from None
    checks.check_bindings()  # types and ranges of every bound value, before anything runs


def refuse_gin_imports(path: str, seen=None, search=()):
    """Gin files are configuration: values are literals (gin uses `ast.literal_eval`), and the
    `import` statements gin would execute (running a module's code) are refused here, in the
    file and in everything it includes."""
    import os

    from gin import config_parser


    class _Delegate(config_parser.ParserDelegate):
        def configurable_reference(self, scoped_name, evaluate):
            return None

        def macro(self, name):
            return None

    full = find(path, search)
    seen = set() if seen is None else seen
    if full is None or os.path.realpath(full) in seen:
        return  # gin itself reports a missing include
    seen.add(os.path.realpath(full))
    with open(full) as fh:
        for st in config_parser.ConfigParser(fh, _Delegate()):
            if isinstance(st, config_parser.ImportStatement) and not st.module.startswith("__gin__."):
                raise UserError(f"{path} line {st.location.line_num}: `{st.format()}` is not allowed: gin files "
                                "are configuration, they may not import Python code")
            if isinstance(st, config_parser.IncludeStatement):
                refuse_gin_imports(st.filename, seen, search)
                if not os.path.isabs(st.filename):
                    refuse_gin_imports(os.path.join(os.path.dirname(full), st.filename), seen, search)
