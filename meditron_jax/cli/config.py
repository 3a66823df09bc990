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

from meditron_jax.config import gin_files
from meditron_jax.training.config import operative_config


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


def run(args) -> int:
    if args.list:
        print("\n".join(gin_files.shipped_configs()))
        return 0
    if not args.gin_file:
        from meditron_jax.errors import UserError
        raise UserError("give at least one --gin_file (see --list for the shipped ones)")
    sys.stdout.write(operative_config(args.gin_file, args.gin_param, args.gin_search_path, args.devices))
    return 0
