"""Host memory policy of our processes: keep freed heap memory for reuse (glibc malloc tuning),
on the CPU backend only, where it was measured.

Owns: `apply(cpu)` (the policy for this process: `MEDITRON_JAX_HOST_MALLOC=keep|default` if set,
else `keep` when JAX runs on the CPU and glibc's defaults otherwise), called by the CLI before
JAX starts its threads (`distributed.environment.cpu_only()` says which backend JAX will
take), by `train.train` once the backend is known, and by bench/train_step_cpu.py; and
`keep_freed_memory()`, the policy itself. Does not own: device memory (XLA's allocators) or
host-offload.

Why: by default glibc serves every block over 32 MB with a fresh `mmap` and unmaps it on free,
trims the heap top above 128 KB, and gives each thread its own arena whose heaps are unmapped
as soon as they are empty. A process that allocates the same large buffers over and over
(XLA:CPU's temporaries of every train / eval step, conversion blocks) then page-faults every
4 KiB page of them afresh each time, which is slow on VMs that back guest memory lazily.
Measured on the 2-vCPU dev VM (docs/benchmarks.md): the config-S train step (3.2 GB of XLA
temporaries) took 3.2 GB of page faults and ~2.4 s of system time per step, 12.9-15.3 s;
with this policy 0 faults, 0.05 s system time, 11.2-12.9 s. A fresh 256 MB numpy buffer:
2.5 s of faults. The cost: the resident set stays at the process's peak (what tcmalloc, which
MaxText and Levanter run under, does too); the first step after a new peak pays the faults once.

Why not on a GPU / TPU host by default: there the step's temporaries live in device memory, so
the faults above do not arise, while one arena makes grain's prefetch threads, tensorstore's
save threads and the main loop share one lock, and a never-trimmed heap keeps a 70B restore's
host memory for the whole run. None of that was measured on such a host; `keep` asks for it.
The choice is made before JAX starts (an arena limit set later does not reach the threads that
already have arenas), which is why it is an environment variable and not a gin value.
"""

from __future__ import annotations

import ctypes
import os
import sys

from meditron_jax.errors import UserError

ENV = "MEDITRON_JAX_HOST_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
_done = False


def policy(cpu: bool, environ=None) -> str:
    """`keep` or `default`: `MEDITRON_JAX_HOST_MALLOC` when set, else `keep` on the CPU backend."""
    env = os.environ if environ is None else environ
    asked = env.get(ENV, "").strip().lower()
    if asked and asked not in ("keep", "default"):
        raise UserError(f"{ENV}={env[ENV]!r}: expected 'keep' or 'default' (unset: 'keep' on the CPU backend only)")
    return asked or ("keep" if cpu else "default")


def apply(cpu: bool, environ=None) -> bool:
    """The policy for this process (`policy`); returns whether freed memory is now kept."""
    return keep_freed_memory() if policy(cpu, environ) == "keep" else _done


def keep_freed_memory() -> bool:
    """Serve every block from the heap (no per-block mmap), never trim it, one arena for all
    threads (a thread arena's heap is unmapped when empty). Process-wide, idempotent; returns
    whether it was applied (Linux with glibc; elsewhere a no-op). All three are needed: measured
    on the S step, leaving out the arena limit or trimming above 2 GB brings the faults back."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = (libc.mallopt(_M_MMAP_MAX, 0) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1  # -1 is SIZE_MAX as glibc's size_t
              and libc.mallopt(_M_ARENA_MAX, 1) == 1)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _done = bool(ok)
    return _done
