"""The aggregator's memory does not grow with the number of parties.

Updates are streamed to disk and read one tensor at a time (`tensorfile`, `weighted_mean`), so
aggregating P updates costs about the new global adapter and its serialised bytes, not P
adapters. Measured as the peak RSS growth of a fresh process running `handle` against SeaweedFS,
and the result compared with the in-memory aggregation of the same updates.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import timedelta

import torch
from fedtune.api.protocol import AggregatorTicket, Download, UpdateIn
from fedtune.api.status import utcnow
from fedtune_trainer.strategies import aggregate_round, make_strategy
from safetensors.torch import load, save

MiB = 1024 * 1024
PARTIES = 16
MODULES, RANK, WIDTH = 64, 8, 4096  # 64 LoRA pairs of 8×4096 float32: a 16 MiB adapter
TTL = 600

# Runs in a fresh interpreter: a warm-up round first (imports, kernels, connection pools, threads
# are not what is measured), then the real one, whose peak resident set (Linux's VmHWM, reset
# before it starts) is compared with the resident set at its start.
MEASURE = """
import json, sys
from fedtune.api.protocol import AggregatorTicket
from fedtune_trainer.aggregator import handle

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

warm, real = (AggregatorTicket.model_validate(t) for t in json.load(sys.stdin))
assert handle(warm).ok
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the resident set now
before = status_kib("VmRSS")
receipt = handle(real)
print(json.dumps({"growth_kib": status_kib("VmHWM") - before, "receipt": receipt.to_wire()}))
"""


def adapter(seed: int, modules: int = MODULES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in range(modules):
        out[f"base_model.model.layers.{m}.q_proj.lora_A.weight"] = torch.randn(RANK, WIDTH, generator=g)
        out[f"base_model.model.layers.{m}.q_proj.lora_B.weight"] = torch.randn(WIDTH, RANK, generator=g)
    return out


class Round:
    """One aggregation round's objects in alice's and hub's buckets, with the aggregator's ticket."""

    def __init__(self, s3world):
        self.parties, self.hub = s3world.bucket("alice"), s3world.bucket("hub")
        self.prefix = f"fedtune/test-{uuid.uuid4().hex[:8]}"

    def ticket(self, global_prev: dict, updates: list[dict], weights: list[int]) -> AggregatorTicket:
        key = f"{self.prefix}/global/0.safetensors"
        sha = self.hub.put_bytes(key, save(global_prev))
        offered = []
        for i, (tensors, n) in enumerate(zip(updates, weights)):
            ukey = f"{self.prefix}/p{i:02d}/update.safetensors"
            usha = self.parties.put_bytes(ukey, save(tensors))
            offered.append(
                UpdateIn(party=f"p{i:02d}", url=self.parties.presign_get(ukey, TTL), sha256=usha, num_samples=n)
            )
        return AggregatorTicket(
            kind="aggregate",
            job="memory-test",
            round=1,
            deadline=utcnow() + timedelta(minutes=10),
            global_in=Download(url=self.hub.presign_get(key, TTL), sha256=sha),
            updates=offered,
            global_out=self.hub.presign_put(f"{self.prefix}/global/1.safetensors", TTL),
        )

    def new_global(self) -> dict[str, torch.Tensor]:
        return load(self.hub.get_bytes(f"{self.prefix}/global/1.safetensors"))


def test_sixteen_updates_cost_about_one_adapter_and_give_the_in_memory_result(s3world):
    warm = Round(s3world).ticket(adapter(0, 2), [adapter(1, 2), adapter(2, 2)], [1, 1])
    rnd = Round(s3world)
    global_prev = adapter(100)
    updates = [adapter(i) for i in range(PARTIES)]
    weights = [10 + i for i in range(PARTIES)]
    size = len(save(global_prev))
    assert 16 * MiB <= size < 17 * MiB
    ticket = rnd.ticket(global_prev, updates, weights)

    done = subprocess.run(
        [sys.executable, "-c", MEASURE],
        input=json.dumps([warm.to_wire(), ticket.to_wire()]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["receipt"]["ok"], result["receipt"]
    assert len(result["receipt"]["accepted"]) == PARTIES
    growth = result["growth_kib"] * 1024
    print(f"peak RSS growth aggregating {PARTIES} x {size / MiB:.1f} MiB: {growth / MiB:.1f} MiB")
    # Holding the updates would cost PARTIES × size (256 MiB here) and more; streaming costs the new
    # global and its serialised bytes, plus allocator and buffer slack.
    assert growth <= 3 * size + 64 * MiB

    expected, _ = aggregate_round(global_prev, updates, weights, make_strategy("fedavg"))
    got = rnd.new_global()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # bit for bit
