"""Benchmark: read every tensor of a Hugging Face safetensors directory, one way per process.
Prints JSON (seconds, peak RSS of this process).

  pread       `HFWeights.read(name, scratch)`: pread into one reused buffer (what import does)
  get_tensor  `safetensors.safe_open(f, framework="numpy").get_tensor(name)` for each tensor

  python bench/safetensors_read.py pread DIR
  python bench/safetensors_read.py get_tensor DIR

DIR: e.g. the source `bench/convert.py --keep` writes (DIR/L<layers>/hf_src).
"""

from __future__ import annotations

import glob
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    mode, d = sys.argv[1], sys.argv[2]
    t0, nbytes = time.perf_counter(), 0
    if mode == "pread":
        from meditron_jax.convert.io import HFWeights, Scratch
        w, scratch = HFWeights(d), Scratch()
        for k in w.keys():
            a = w.read(k, scratch)
            nbytes += a.nbytes
            int(a.view(np.uint8)[::4096].sum())  # touch it
    elif mode == "get_tensor":
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors needs)
        from safetensors import safe_open
        for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            with safe_open(f, framework="numpy") as h:
                for k in h.keys():
                    a = h.get_tensor(k)
                    nbytes += a.nbytes
                    int(a.view(np.uint8)[::4096].sum())
                    del a
    else:
        raise SystemExit(f"unknown mode {mode!r}: pread or get_tensor")
    print(json.dumps({"mode": mode, "gb": round(nbytes / 1e9, 3), "seconds": round(time.perf_counter() - t0, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))


if __name__ == "__main__":
    main()
