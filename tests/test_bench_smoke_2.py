"""The model and scale benchmarks (bench/throughput.py, quality.py, flower_compare.py,
operator_scale.py) run end to end in their --smoke size and write their results tables.

Each script runs as a subprocess, as a person would run it, into a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from bench_smoke import run_smoke, table


def table_rows(text: str, first_header: str) -> list[list[str]]:
    return table(text, first_header)[1]


def test_throughput_smoke(tmp_path):
    text = run_smoke("throughput.py", tmp_path)
    assert "SMOKE RUN" in text and "torch: " in text and "cpu: " in text
    rows = {r[0]: r for r in table_rows(text, "variant")}
    assert "plain" in rows and "fedtune" in rows
    if importlib.util.find_spec("deepspeed") is not None:
        assert "fedtune+ZeRO-2" in rows
    assert rows["plain"][2] == "1.000" and rows["plain"][4] == "1.000"
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows.values())
    raw = json.loads((tmp_path / "throughput.json").read_text())
    assert set(raw["wall"]) == set(rows) and all(t > 0 for ts in raw["wall"].values() for t in ts)
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_smoke(tmp_path):
    text = run_smoke("quality.py", tmp_path)
    assert "SMOKE RUN" in text and "Small-sample runs" in text
    rows = {r[0]: r for r in table_rows(text, "method")}
    assert {"central", "local", "fedavg", "majority class"} <= set(rows)
    for name in ("central", "local", "fedavg"):
        assert 0.0 <= float(rows[name][1]) <= 1.0
    # Round 0 is the same initial adapter for every method: one accuracy, whatever trains after it.
    per_round = table(text, "method")[0].index("iid acc per round")
    assert len({rows[name][per_round].split(" → ")[0] for name in ("central", "local", "fedavg")}) == 1
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_flower_compare_smoke(tmp_path):
    if importlib.util.find_spec("flwr") is None:
        pytest.skip("flwr is not installed (pip install -e '.[bench]')")
    text = run_smoke("flower_compare.py", tmp_path, "flower.md")
    rows = {r[1].split()[0]: r for r in table_rows(text, "run")}
    assert set(rows) == {"fedtune", "Flower"}
    assert 0.0 <= float(rows["fedtune"][-6]) <= 1.0 and 0.0 <= float(rows["Flower"][-6]) <= 1.0
    # The same training code on the same shards from the same adapter: the same accuracy every round.
    header = table(text, "run")[0]
    rounds = [i for i, h in enumerate(header) if h.startswith("acc r") and h != "acc r0"]
    assert rounds and [rows["fedtune"][i] for i in rounds] == [rows["Flower"][i] for i in rounds]
    ratios = {r[0]: r[1] for r in table_rows(text, "ratio (fedtune / Flower), means over runs")}
    assert float(ratios["wall time per round"]) > 0
    assert (tmp_path / "flower.png").read_bytes()[:4] == b"\x89PNG"


def test_operator_scale_smoke(tmp_path):
    """One job of 4 parties against a real control plane (tests/kube_cluster.py), beside the emulator's figures."""
    if importlib.util.find_spec("kopf") is None:
        pytest.skip("kopf is not installed (the dev and operator extras)")
    text = run_smoke("operator_scale.py", tmp_path)
    header, rows = table(text, "jobs")
    (row,) = rows
    assert row[:3] == ["1", "5/5", "1/1"]  # 4 trainers + 1 aggregator, all created
    cell = dict(zip(header, row))
    assert float(cell["job→pods p50 s"]) > 0 and int(cell["Bucket objects built"]) > 0
    assert cell["boto3 clients held"] == "5"  # one S3 client per credentials (4 parties + hub), not per Bucket
    assert float(cell["RSS settled MiB"]) > 0 and float(cell["burst CPU s, operator process"]) >= 0
    assert all(float(x) > 0 for x in cell["kube-apiserver RSS idle / after / settled MiB"].split(" / "))
    assert float(cell["burst CPU s, kube-apiserver"]) >= 0 and float(cell["burst CPU s, etcd"]) >= 0
    # The same scale measured earlier against the API emulator, read from the committed results.
    header, rows = table(text, "jobs × parties")
    assert [(r[0], r[1]) for r in rows] == [("1 × 4", "emulator (earlier run)"), ("1 × 4", "kube-apiserver")]
    assert all(float(r[header.index("API server RSS MiB")]) > 0 for r in rows)
    doc = json.loads((tmp_path / "operator_scale.json").read_text())
    assert doc["results"][0]["apiserver_rss_settled"] > 0 and "kube-apiserver" in doc["machine"]
    assert (tmp_path / "operator_scale.png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_bench_smoke(tmp_path):
    """bench/gpu.py's tiny config on CPU: both methods, with and without checkpointing, and one round."""
    text = run_smoke("gpu.py", tmp_path)
    assert "SMOKE RUN" in text and "bitsandbytes: " in text
    header, rows = table(text, "size")
    assert header[:6] == ["size", "method", "grad ckpt", "plain tok/s", "fedtune tok/s", "ratio"]
    assert [(r[1], r[2]) for r in rows] == [(m, c) for m in ("LoRA bf16", "QLoRA 4-bit") for c in ("off", "on")]
    for r in rows:  # every variant was measured (bitsandbytes' CPU backend runs QLoRA here)
        plain, fedtune, ratio = float(r[3]), float(r[4]), float(r[5])
        assert plain > 0 and fedtune > 0 and ratio > 0, r
    assert "Federated round in local mode: tiny, 2 parties, 1 round" in text and "Succeeded" in text
