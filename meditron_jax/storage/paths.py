"""The one path layer for the run's outputs: local paths and `gs://` URLs through etils `epath`,
the path library Orbax itself uses (so the checkpoints and everything around them live in one place).

Owns: `resolve(path)` (which storage a workdir or checkpoint path names, refused in one line when it
cannot be written: an unknown scheme, or `gs://` without its filesystem package), `is_remote`, and
the few file operations the trainer, the checkpoint listing and the lock need, each working on both:
`join`, `absolute`, `exists`, `isdir`, `listdir`, `makedirs`, `read_text`, `write_text` (a whole file
at once: a temporary name and a rename locally, one object upload remotely, so a reader never sees
half of it), `remove`, `rename`, `rmtree`, `glob`, `tree_bytes`, `mtime`.

Local paths stay plain strings and go through `os` (every local behaviour of the trainer is kept:
O_EXCL lock creation, pid checks, statvfs free space); a remote path is an `epath.Path`, which
reaches `gs://` through fsspec's `gcsfs` (the `gcs` extra: `pip install 'meditron-jax[gcs]'`) or
through TensorFlow's gfile when TensorFlow is installed. Orbax writes the arrays with tensorstore's
own `gcs` driver, which needs no extra package. What differs remotely is said where it happens:
no free-space check (`storage`), the run lock by create-if-absent plus heartbeat (`workdir`),
metrics.jsonl rewritten as a whole (`metrics`), the profiler trace uploaded after it stops.

Does not own: what is written (checkpoint.py, metrics.py, workdir.py), the error types (errors.py).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import posixpath
import uuid

from meditron_jax.errors import UserError

# scheme -> (Python package that gives epath its filesystem, the extra that installs it)
REMOTE = {"gs": ("gcsfs", "gcs")}


def scheme(path) -> str | None:
    path = str(path)
    return path.split("://", 1)[0] if "://" in path else None


def is_remote(path) -> bool:
    return scheme(path) in REMOTE


def resolve(path, what: str = "workdir") -> str:
    """`path` as the rest of the code uses it: a local path (a `file://` URL made one) or a
    supported URL. Refuses, in one line and before anything runs, what cannot be written: an
    unknown scheme, a remote scheme whose filesystem package is missing. Never creates anything."""
    path = str(path)
    s = scheme(path)
    if s is None:
        return path
    rest = path.split("://", 1)[1]
    if s == "file":
        if not rest.startswith("/"):
            raise UserError(f"{what} {path}: a file:// URL needs an absolute path (file:///abs/path)")
        return rest
    if s not in REMOTE:
        raise UserError(f"{what} {path}: {s}:// storage is not supported (supported: local paths, file:///abs/path, "
                        f"{', '.join(k + '://' for k in REMOTE)}); use a local or mounted path")
    package, extra = REMOTE[s]
    if importlib.util.find_spec(package) is None and importlib.util.find_spec("tensorflow") is None:
        raise UserError(f"{what} {path}: {s}:// needs the {package} package, which is not installed "
                        f"(pip install 'meditron-jax[{extra}]')")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise UserError(f"{what} {path}: no bucket in the URL ({s}://BUCKET/path)")
    return path.rstrip("/")


def _epath(path):
    from etils import epath
    return epath.Path(path)


def join(path, *parts) -> str:
    if is_remote(path):
        return posixpath.join(str(path), *map(str, parts))
    return os.path.join(path, *parts)


def absolute(path) -> str:
    return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path) -> list[str]:
    if is_remote(path):
        return [p.name for p in _epath(path).iterdir()]
    return os.listdir(path)


def makedirs(path) -> None:
    if is_remote(path):
        return  # an object store has no directories (and gcsfs's makedirs may create a missing bucket)
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path) -> str:
    if is_remote(path):
        return _epath(path).read_text()
    with open(path) as f:
        return f.read()


def write_text(path, text: str) -> None:
    """The whole file at once; readers see the old or the new content, never a part."""
    if is_remote(path):
        _epath(path).write_text(text)  # one object upload: visible when complete
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove(path) -> None:
    if is_remote(path):
        _epath(path).unlink(missing_ok=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def rename(src, dst) -> None:
    """Moves a file or a directory (remotely a copy then a delete, not atomic: only used to set
    checkpoints aside, never to commit one)."""
    if is_remote(src):
        import fsspec

        fs, src_path = fsspec.core.url_to_fs(str(src))
        fs.mv(src_path, fsspec.core.url_to_fs(str(dst))[1], recursive=True)
    else:
        os.rename(src, dst)


def rmtree(path) -> None:
    if is_remote(path):
        p = _epath(path)
        if p.exists():
            p.rmtree()
    else:
        import shutil
        shutil.rmtree(path, ignore_errors=True)


def glob(directory, pattern: str) -> list[str]:
    """Entries of `directory` whose name matches `pattern` (one level, no recursion)."""
    if not isdir(directory):
        return []
    return [join(directory, n) for n in sorted(listdir(directory)) if fnmatch.fnmatchcase(n, pattern)]


def tree_bytes(path) -> int:
    """Bytes of the files under `path` (0 when it is gone)."""
    if is_remote(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(str(path))
        try:
            return int(fs.du(p, total=True))
        except (OSError, FileNotFoundError):
            return 0
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def mtime(path) -> float | None:
    try:
        if is_remote(path):
            st = _epath(path).stat()
            return float(st.mtime) if st.mtime is not None else None
        return os.path.getmtime(path)
    except (OSError, FileNotFoundError, AttributeError, ValueError):
        return None


def check_writable(path, what: str = "workdir") -> None:
    """Creates `path` and writes and removes a probe file in it: one line (exit 2) when that
    fails (a read-only disk, a missing bucket, no credentials), before data or a compile."""
    probe = join(path, f".write_probe_{os.getpid()}_{uuid.uuid4().hex[:6]}")
    try:
        makedirs(path)
        write_text(probe, "ok")
        remove(probe)
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - a remote filesystem's own errors (auth, HTTP)
        if not is_remote(path):
            raise
        msg = " ".join(str(e).split())[:200]
        raise UserError(f"{what} {path} is not writable ({type(e).__name__}: {msg})") from None
