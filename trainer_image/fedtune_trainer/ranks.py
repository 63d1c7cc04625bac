"""The ranks of a multi-GPU party pod: one process per GPU, started by torchrun (fedtune.api.launch).

Rank 0 alone reads the mailbox and talks to S3. It hands every ticket it works on to the other
ranks, and with it whatever they need (the examples, the global adapter's tensors), over a gloo
group of its own (`control`), so objects travel on the CPU whatever the training backend is.
The training loop is an ordinary data-parallel one over the default group (NCCL on GPUs, gloo on
CPU). Three rules keep the ranks in step:

- `share`: what rank 0 alone does (downloads) reaches the others as its result or as its error,
  so either every rank goes on or every rank fails the ticket;
- `together`: what every rank does on its own (loading the model) is followed by a vote, so one
  rank failing fails the ticket on all of them;
- `lockstep`: where collectives run (loading the global adapter, which ZeRO-3 partitions,
  evaluation, training, and the handing over itself), a rank that fails cannot tell the others,
  which are waiting in a collective for it: it exits non-zero instead, torchrun
  (`--max-restarts=0`) ends the other ranks, and the pod's restart and the round state machine
  take over. So does a collective that fails because a rank died.

A pod of one process gets `SOLO`, for which all of this is free.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from fedtune.lifeline import die_with_parent

log = logging.getLogger(__name__)
T = TypeVar("T")

# A training collective waits this long for a rank that is alive but stuck; a rank that died is
# noticed by torchrun at once. The control group waits for rank 0's next ticket, which may be
# as far away as the job is long (other parties training, the operator down for a while): rank 0's
# death, not a timeout, ends that wait.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
TICKET_WAIT_TIMEOUT = timedelta(days=30)


class RankError(RuntimeError):
    """Another rank failed a step every rank takes part in: this one fails the ticket with its reason."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in its pod: rank `rank` of `world`, and the group tickets travel on."""

    rank: int = 0
    world: int = 1
    control: Any = None  # the gloo process group of `share` and `together` (None when alone)

    @property
    def lead(self) -> bool:
        """Rank 0: the one that reads the mailbox, talks to S3 and uploads."""
        return self.rank == 0

    def share(self, produce: Callable[[], T]) -> T:
        """Rank 0 runs `produce` and every rank gets its result, or raises its error (RankError elsewhere).

        The other ranks never call `produce`; they wait here for rank 0.
        """
        if self.world == 1:
            return produce()
        if self.lead:
            try:
                value = produce()
            except Exception as exc:
                self._broadcast({"error": f"rank 0: {type(exc).__name__}: {exc}"})
                raise
            self._broadcast({"value": value})
            return value
        message = self._broadcast(None)
        if "error" in message:
            raise RankError(message["error"])
        return message["value"]

    def hand_out(self, ticket: dict[str, Any]) -> None:
        """Rank 0: give the other ranks the (raw) ticket it is about to work on."""
        if self.world > 1:
            self._broadcast({"value": ticket})

    def next_ticket(self) -> dict[str, Any]:
        """A rank other than 0: wait for the next ticket rank 0 hands out."""
        return self._broadcast(None)["value"]

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A step every rank takes on its own, without collectives inside: if any rank fails it, all do."""
        if self.world == 1:
            yield
            return
        error: Exception | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = exc
        outcomes: list[str | None] = [None] * self.world
        mine = None if error is None else f"rank {self.rank}: {type(error).__name__}: {error}"
        with self.lockstep("comparing notes with the other ranks"):
            torch.distributed.all_gather_object(outcomes, mine, group=self.control)
        if error is not None:
            raise error
        failed = next((o for o in outcomes if o), None)
        if failed:
            raise RankError(failed)

    @contextlib.contextmanager
    def lockstep(self, what: str) -> Iterator[None]:
        """Work with collectives inside (`what`, for the log): failing here ends this process (see module doc)."""
        try:
            yield
        except Exception as exc:
            if self.world == 1:
                raise
            log.exception(
                "rank %d of %d: %s failed; exiting, so that torchrun stops every rank", self.rank, self.world, what
            )
            raise SystemExit(1) from exc

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks in float64 (a round's loss and counts, evaluation's sums)."""
        if self.world == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(total, group=self.control)
        return total.tolist()

    def close(self) -> None:
        """Leave the process group (after the exit ticket)."""
        if self.world > 1:
            torch.distributed.destroy_process_group()

    def _broadcast(self, message: dict | None) -> dict:
        box = [message]
        # A broadcast fails when a rank died: the group is gone, and so is this pod (torchrun ends it).
        with self.lockstep("handing work from rank 0 to the others"):
            torch.distributed.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


SOLO = Ranks()


def from_env() -> Ranks:
    """This process's ranks from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK); SOLO without them.

    Joins the pod's process group: NCCL with one GPU per rank where CUDA is available, else gloo on
    the CPU (how multi-GPU parties run on a machine without GPUs, and in the tests).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SOLO
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    # torchrun starts each rank in a session of its own: without this a rank would outlive a
    # launcher that was SIGKILLed (in a container the whole pod goes anyway).
    die_with_parent()
    if torch.cuda.is_available():
        torch.cuda.set_device(local)  # before anything touches CUDA: pick_device() then answers cuda:LOCAL_RANK
        backend, where = "nccl", f"GPU {local}"
    else:
        backend, where = "gloo", f"CPU ({torch.get_num_threads()} thread(s); no GPU visible)"
    torch.distributed.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    control = torch.distributed.new_group(backend="gloo", timeout=TICKET_WAIT_TIMEOUT)
    log.info(
        "rank %d of %d on %s, %s; %s",
        rank,
        world,
        where,
        backend,
        "reads the mailbox and talks to S3" if rank == 0 else "follows rank 0 (no mailbox, no S3)",
    )
    return Ranks(rank=rank, world=world, control=control)
