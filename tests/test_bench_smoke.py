"""The communication, overhead and aggregation benchmarks still run (--smoke) and write their tables.

Benchmarks are not tests: only their smoke modes run here, so the scripts do not rot.
"""

from __future__ import annotations

import pytest
from bench_smoke import machine_noted, run_smoke, tables


def size_bytes(cell: str) -> float:
    """'599.71 kB' -> 599710.0 (the tables' decimal units)."""
    value, unit = cell.split()
    return float(value) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def test_communication_smoke(tmp_path):
    md = run_smoke("communication.py", tmp_path)
    assert machine_noted(md) and "Self-check passed" in md
    (bytes_table,) = tables(md)
    header, rows = bytes_table[0], bytes_table[1:]
    assert header[:7] == ["model", "method", "trainable params", "% of model", "none", "bf16", "int8"]
    methods = {"LoRA r=4", "LoRA r=8", "LoRA r=16", "IA3", "prompt tuning", "full fine-tuning"}
    for model in ("MiniLM-L6 (seq-cls)", "GPT-2 124M", "Llama 7B shape"):
        assert {r[1] for r in rows if r[0] == model} == methods
    for r in rows:  # quantising an update only ever shrinks it
        none, bf16, int8 = (size_bytes(c) for c in r[4:7])
        assert none > bf16 > int8 > 0, r
    params = {r[1]: int(r[2].replace(",", "")) for r in rows if r[0] == "GPT-2 124M"}
    assert params["LoRA r=16"] == 2 * params["LoRA r=8"] == 4 * params["LoRA r=4"]  # LoRA grows linearly in r
    assert (tmp_path / "communication.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_overhead_smoke(tmp_path):
    md = run_smoke("overhead.py", tmp_path)
    assert machine_noted(md)
    summary, split = tables(md)
    assert summary[0][:4] == ["parties", "rounds", "overhead median s", "overhead p90 s"]
    assert [r[0] for r in summary[1:]] == ["2"] and summary[1][1] == "2"
    assert float(summary[1][2]) >= 0
    assert all(float(c) >= 0 for r in split[1:] for c in r[1:])  # every step of the critical path
    assert split[0][1:] == [f"{k} s" for k in ("pickup+misc", "download", "eval", "train", "upload")] + [
        "hand-off s",
        "aggregate s",
        "notice s",
    ]
    assert (tmp_path / "overhead.png").exists()


@pytest.mark.slow
def test_aggregation_smoke(tmp_path):
    md = run_smoke("aggregation.py", tmp_path)
    assert machine_noted(md)
    (table,) = tables(md)
    assert table[0][:5] == ["dtype", "mode", "P", "inputs MiB (P x adapter)", "time s"]
    got = {(r[0], r[1], r[2]) for r in table[1:]}
    assert got == {(d, m, p) for d in ("float32", "bfloat16") for m in ("average", "exact") for p in ("2", "4")}
    assert all(float(r[4]) >= 0 for r in table[1:])
    assert (tmp_path / "aggregation.png").exists()
