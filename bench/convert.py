"""Benchmark: streaming import / export of a Llama-2-7B-shaped checkpoint. Prints JSON.

Writes a synthetic Hugging Face checkpoint (random bf16 weights with Llama-2-7B's names and
shapes, sharded safetensors of <= 5 GB + index, `--layers` deep), then times, each in its own
process so peak RSS is that process's own (os.wait4 rusage):
  copy    a plain copy of the same safetensors bytes on the same disk (the yardstick)
  import  `meditron-jax import --from hf` (bf16 -> fp32 Orbax checkpoint)
  export  `meditron-jax export --to hf` (fp32 checkpoint -> bf16 safetensors)
Each timed region ends with a `sync`, so write-back to disk is counted for every step alike.
Throughput is source bytes (the bf16 safetensors) per second for all three.

  python bench/convert.py --layers 32 --layers 8 [--dir /tmp/convert_bench] [--keep]

Needs /usr/bin/time (GNU time) for the per-process peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meditron_jax.models.config import preset  # noqa: E402
from meditron_jax.convert import hf  # noqa: E402
from meditron_jax.convert.io import SafetensorsWriter  # noqa: E402


def synth_hf(directory: str, cfg, max_shard: int = 5 * 10**9, seed: int = 0) -> int:
    """Random bf16 weights (sign, a few exponents near 2^-6, random mantissa: entropy like
    real weights), written shard by shard; returns the total tensor bytes."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = [(hf.hf_names("embed_tokens", cfg)[0], "embed_tokens")]
    for i in range(cfg.num_layers):
        order += [(hf.hf_names(n, cfg)[i], n) for n in hf.STACKED]
    order += [(hf.hf_names("norm", cfg)[0], "norm"), (hf.hf_names("lm_head", cfg)[0], "lm_head")]
    shards, used = [[]], 0
    for key, name in order:
        n = int(np.prod(hf.hf_shape(name, cfg))) * 2
        if shards[-1] and used + n > max_shard:
            shards.append([])
            used = 0
        shards[-1].append((key, name))
        used += n
    weight_map, total = {}, 0
    for s, shard in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(os.path.join(directory, fname),
                              [(k, hf.hf_shape(n, cfg), ml_dtypes.bfloat16) for k, n in shard])
        for key, name in shard:
            bits = rng.integers(0, 1 << 16, hf.hf_shape(name, cfg), dtype=np.uint16)
            bits = (bits & np.uint16(0x807F)) | ((np.uint16(118) + ((bits >> 7) & np.uint16(3))) << 7)
            w.write(key, bits.view(ml_dtypes.bfloat16))
            weight_map[key] = fname
            total += bits.nbytes
        w.close()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_hf(torch_dtype="bfloat16"), f)
    return total


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def timed(cmd: list[str]) -> dict:
    """Run `cmd` under /usr/bin/time (its peak RSS is the command's own, not inherited from
    this big process through fork); wall seconds include a final sync. Also the load average,
    since the machine may be shared."""
    os.sync()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "TIME %M %U %S", *cmd], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    os.sync()
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed: {r.stderr[-2000:]}")
    kib, user, sys_ = r.stderr.strip().splitlines()[-1].split()[1:]
    return {"seconds": round(dt, 2), "peak_rss_gib": round(int(kib) / 2**20, 3),
            "cpu_seconds": round(float(user) + float(sys_), 1),
            "load_avg_1m": [round(load0, 1), round(os.getloadavg()[0], 1)]}


def bench_depth(root: str, layers: int, keep: bool) -> dict:
    cfg = preset("llama2_7b").replace(num_layers=layers)
    d = os.path.join(root, f"L{layers}")
    src, copy, ck, out = (os.path.join(d, x) for x in ("hf_src", "copy", "ckpt", "hf_out"))
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    nbytes = synth_hf(src, cfg)
    os.sync()
    res = {"layers": layers, "params": cfg.num_params(), "source_bytes": nbytes,
           "synth_seconds": round(time.perf_counter() - t0, 1)}
    py = sys.executable
    res["copy"] = timed([py, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])", src, copy])
    shutil.rmtree(copy)
    res["import"] = timed([py, "-m", "meditron_jax", "import", "--from", "hf", src, "--out", ck])
    res["checkpoint_bytes_on_disk"] = du(ck)
    res["export"] = timed([py, "-m", "meditron_jax", "export", ck, "--to", "hf", "--out", out])
    res["export_bytes"] = du(out)
    for k in ("copy", "import", "export"):
        res[k]["source_gb_per_s"] = round(nbytes / res[k]["seconds"] / 1e9, 3)
    for k in ("import", "export"):
        res[k]["vs_copy"] = round(res["copy"]["seconds"] / res[k]["seconds"], 3)
    # the round trip must be exact (bf16 -> fp32 -> bf16)
    from meditron_jax.convert.io import HFWeights
    a, b = HFWeights(src), HFWeights(out)
    res["roundtrip_bitwise"] = all(np.array_equal(a.read(k).view(np.uint16), b.read(k).view(np.uint16))
                                   for k in a.keys())
    if not keep:
        shutil.rmtree(d, ignore_errors=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, action="append", help="model depths to run (default: 32 and 8)")
    ap.add_argument("--dir", default="/tmp/meditron_convert_bench")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir))).free
    need = 3.2 * 2 * preset("llama2_7b").replace(num_layers=max(args.layers or [32])).num_params()
    if free < need:
        raise SystemExit(f"{args.dir}: {free / 1e9:.0f} GB free, the largest run needs about {need / 1e9:.0f} GB")
    results = {"machine": {"cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf(
        "SC_PHYS_PAGES") / 2**30, 1)}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
    for layers in args.layers or [32, 8]:
        results["runs"].append(bench_depth(args.dir, layers, args.keep))
        print(json.dumps(results["runs"][-1]), file=sys.stderr, flush=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
