"""Entry point of trainer and aggregator pods: `python -m fedtune_trainer party|aggregator --mailbox URI`.

`python -m fedtune_trainer zygote [--config FILE]` is local mode's warm start (fedtune_trainer.zygote);
`python -m fedtune_trainer teacher ...` prepares a distillation teacher (fedtune_trainer.teacher);
`python -m fedtune_trainer emulator ...` derives an offsite-tuning emulator (fedtune_trainer.offsite).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fedtune.api.mailbox import POLL_SECONDS  # light: json and files only


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["zygote"]:
        zp = argparse.ArgumentParser(prog="fedtune_trainer zygote")
        zp.add_argument("--config", default=None, help="a trainer config (JSON): its model is loaded before forking")
        zargs = zp.parse_args(argv[1:])
        from fedtune_trainer.zygote import serve as serve_zygote

        return serve_zygote(zargs.config)
    if argv[:1] == ["teacher"]:
        from fedtune_trainer.teacher import main as teacher_main

        return teacher_main(argv[1:])
    if argv[:1] == ["emulator"]:
        from fedtune_trainer.offsite import build_main

        return build_main(argv[1:])
    parser = argparse.ArgumentParser(prog="fedtune_trainer", description=__doc__)
    parser.add_argument("role", choices=["party", "aggregator"], help="what this pod does")
    parser.add_argument(
        "--mailbox", required=True, help="k8s://<namespace>/<secret> on Kubernetes, or a directory (local mode)"
    )
    parser.add_argument("--poll", type=float, default=POLL_SECONDS, help="seconds between mailbox checks")
    args = parser.parse_args(argv)
    name = os.environ.get("FEDTUNE_NAME", args.role)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every rank writes to the pod's log
        name += f"/rank{os.environ.get('RANK', '?')}"
    logging.basicConfig(
        level=os.environ.get("FEDTUNE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.role == "party":
        from fedtune_trainer.party import serve
    else:
        from fedtune_trainer.aggregator import serve
    return serve(args.mailbox, poll=args.poll)


if __name__ == "__main__":
    sys.exit(main())
