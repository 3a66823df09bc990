"""`meditron-jax plan`: the flags and the printed verdict (exit 0 fits, 1 does not fit, 2 user
error); the compile is `plan.compile`, the report `plan.report`."""

from __future__ import annotations

import json

from meditron_jax.errors import UserError
from meditron_jax.plan.compile import plan
from meditron_jax.plan.report import print_report


def add_arguments(p):
    p.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    p.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
    p.add_argument("--target", default="cpu",
                   help="cpu (default), a100-80gb, a100-40gb, h100-80gb, h200, or a TPU slice: "
                        "v5p-N, v5e-N, v6e-N, v4-N")
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices where the target does not fix it (cpu: simulated; "
                        "GPU targets: default one host of 8)")
    p.add_argument("--explain", action="store_true",
                   help="list the largest buffers of the compiled step with their source lines")
    p.add_argument("--top", type=int, default=12, help="how many buffers / collectives to list (default 12)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    if args.devices is not None and args.devices < 1:
        raise UserError(f"--devices must be >= 1, got {args.devices}")
    result = plan(args.gin_file, args.gin_param, args.devices, args.target, args.explain, args.top)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_report(result, args.explain)
    return 0 if result["verdict"]["fits"] else 1
