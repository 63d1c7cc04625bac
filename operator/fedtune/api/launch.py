"""The command a trainer or aggregator pod runs: one process, or one per GPU under torchrun.

Pure, and shared by the operator's pod builders and local mode, so both start a pod the same way.
A party with `compute.gpusPerPod: N > 1` runs N ranks (fedtune_trainer.ranks): torchrun
(`python -m torch.distributed.run`, which needs no console script on the PATH) starts them, and
with `--max-restarts=0` a rank that dies ends the whole group, so the pod exits non-zero and
Kubernetes (or local mode's runner) with the round state machine takes over, instead of the
launcher restarting ranks behind their backs.
"""

from __future__ import annotations

PYTHON = "python"  # the image's interpreter; local mode and the tests put theirs in its place
TRAINER = [PYTHON, "-m", "fedtune_trainer"]


def pod_command(role: str, mailbox: str, world_size: int = 1) -> list[str]:
    """The container command of a `role` pod ("party" or "aggregator") reading `mailbox`.

    World size 1: `python -m fedtune_trainer ROLE --mailbox URI`. World size N: the same module
    under torchrun, N processes on this one node.
    """
    args = [role, "--mailbox", mailbox]
    if world_size <= 1:
        return [*TRAINER, *args]
    if role != "party":
        raise ValueError(f"only party pods run several ranks; a {role} pod runs one process")
    return [*torchrun(world_size), *TRAINER[1:], *args]


def torchrun(world_size: int) -> list[str]:
    """torchrun starting `world_size` ranks on this node; a module (`-m NAME`) or a script follows."""
    return [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one node: a local rendezvous on a free port, no etcd or master to name
        f"--nproc-per-node={world_size}",
        "--max-restarts=0",
    ]


def single_process_args(command: list[str]) -> list[str] | None:
    """The `fedtune_trainer` arguments of a one-process pod command; None for a launcher command.

    Local mode forks one-process pods from its warm zygote; a launcher command runs as it is.
    """
    return command[len(TRAINER) :] if command[: len(TRAINER)] == TRAINER else None
