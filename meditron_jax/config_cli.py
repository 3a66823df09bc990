"""`meditron-jax config --gin_file F [--gin_param ...]`: the operative configuration of a run.

Prints (stdout) what `train` would run with: every `train.*`, `model.*`, `optimizer.*`,
`mesh.*`, `sharding.*`, `pipeline.*`, `data.*` and `checkpoint.*` value, defaults included, in
gin syntax (the same text `train` writes to WORKDIR/config.gin). The values are checked
exactly as `train` checks them before it starts (types, ranges, batch / mesh / model
agreement), so a config that prints is one `train` accepts up to its data and workdir. It
builds no data, touches no workdir and compiles nothing. `--list` names the gin files shipped
with the package.
"""

from __future__ import annotations

import sys


def add_arguments(p):
    add_gin_arguments(p)
    p.add_argument("--devices", type=int, default=None,
                   help="device count the mesh is resolved for (default: the devices JAX sees here)")
    p.add_argument("--list", action="store_true", help="list the gin files shipped with the package and exit")


def add_gin_arguments(p):
    """The gin flags shared by `train`, `config` (one spelling; the old ones stay accepted)."""
    p.add_argument("--gin_file", "--gin-file", dest="gin_file", action="append", default=[],
                   help="gin config file, repeatable (relative paths are also looked up in --gin_search_path "
                        "and in the configs shipped with the package)")
    p.add_argument("--gin_param", "--gin-param", dest="gin_param", action="append", default=[],
                   help="gin binding, repeatable, e.g. 'train.steps=100' (strings need quotes: "
                        "\"data.tokenizer='/x/tokenizer.model'\")")
    p.add_argument("--gin_search_path", "--gin-search-path", dest="gin_search_path", action="append", default=[],
                   help="directory searched for --gin_file and for gin `include`s, repeatable")


def operative_config(gin_files, gin_params, search_path=(), devices: int | None = None) -> str:
    import gin

    from meditron_jax import checkpoint
    from meditron_jax.config import gin_call
    from meditron_jax.ginfiles import parse_gin
    from meditron_jax.data.pipeline import data_config
    from meditron_jax.training.config import accumulation_steps, read_run_config, validate_shapes

    parse_gin(list(gin_files), list(gin_params), search_path=search_path)
    run = read_run_config(num_devices=devices, resolve_init_from=False)
    tc, cfg, sizes = run.train, run.model, run.mesh_sizes
    gin_call(data_config)
    gin_call(checkpoint.manager_options)
    validate_shapes(tc, cfg, sizes, run.pipeline, run.sync)

    resolved = ["", "# Resolved (what the presets and -1s above become):",
                "#   model: " + ", ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items()),
                f"#   model parameters: {cfg.num_params():,}",
                "#   mesh: " + " ".join(f"{k}={v}" for k, v in sizes.items()) + f" ({_prod(sizes)} devices)",
                f"#   gradient accumulation steps per global batch: {accumulation_steps(tc, cfg, sizes, run.pipeline)}",
                f"#   tokens per step: {tc.global_batch_size * tc.seq_len:,}", ""]
    return gin.operative_config_str() + "\n".join(resolved)


def _prod(sizes) -> int:
    import math
    return math.prod(sizes.values())


def run(args) -> int:
    if args.list:
        from meditron_jax import ginfiles
        print("\n".join(ginfiles.shipped_configs()))
        return 0
    if not args.gin_file:
        from meditron_jax.errors import UserError
        raise UserError("give at least one --gin_file (see --list for the shipped ones)")
    sys.stdout.write(operative_config(args.gin_file, args.gin_param, args.gin_search_path, args.devices))
    return 0
