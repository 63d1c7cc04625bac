"""bench/algorithms.py runs end to end in its --smoke size: FedLoRA, full FedAvg, FedKD-LoRA (with a
teacher that `fedtune teacher` prepared), FedKSeed, personalised FedLoRA and offsite tuning as real local-mode
jobs, one row each, the personalised run's per-party table and offsite tuning's plugged-in full model."""

from __future__ import annotations

import re

from bench_smoke import machine_noted, run_smoke, table

METHODS = ["FedLoRA", "full FedAvg", "FedKD-LoRA", "FedKSeed", "personalised FedLoRA", "offsite tuning"]
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6}


def _bytes(cell: str) -> float:
    number, unit = cell.split()
    return float(number) * UNITS[unit]


def test_algorithms_smoke(tmp_path):
    text = run_smoke("algorithms.py", tmp_path)
    assert "SMOKE RUN" in text and machine_noted(text) and "chatterbot-corpus: " in text
    assert "Bottleneck adapters" in text and "not in this build" in text

    header, rows = table(text, "method")
    assert header[1:3] == ["final accuracy", "final eval loss"]
    cell = {r[0]: dict(zip(header, r)) for r in rows}
    assert [r[0] for r in rows] == [*METHODS, "majority class"]  # a row per method
    for name in METHODS:
        c = cell[name]
        assert 0.0 <= float(c["final accuracy"]) <= 1.0
        curve = [float(a) for a in c["accuracy per round"].split(" → ")]
        assert len(curve) == 2 and all(0.0 <= a <= 1.0 for a in curve)  # round 0 and round 1
        losses = [float(x) for x in c["eval loss per round"].split(" → ")]
        assert len(losses) == 2 and all(x > 0 for x in losses) and float(c["final eval loss"]) > 0
        assert float(c["runtime s"]) > 0

    # Full FedAvg moves the whole model; FedLoRA an adapter: at least ten times fewer bytes.
    lora, full = (
        _bytes(cell["FedLoRA"]["bytes up+down per party per round"]),
        _bytes(cell["full FedAvg"]["bytes up+down per party per round"]),
    )
    assert lora > 0 and full > 10 * lora, (lora, full)
    assert _bytes(cell["FedKD-LoRA"]["bytes up+down per party per round"]) == lora  # the teacher never travels

    # FedKD-LoRA ran with the teacher: its loss column, the teacher's accuracy and the distillation term.
    assert cell["FedKD-LoRA"]["final eval loss"] not in ("", "-")
    m = re.search(r"teacher \(`fedtune teacher`.*?accuracy ([0-9.]+).*?T²·KL per round ([0-9.e+-]+)", text)
    assert m, text
    assert 0.0 <= float(m.group(1)) <= 1.0 and float(m.group(2)) >= 0.0

    # FedKSeed: the K-scalar accumulator down and (seed, scalar) pairs up, under 18 KB and far below an adapter.
    kseed = _bytes(cell["FedKSeed"]["bytes up+down per party per round"])
    assert 0 < kseed < 18_000 and kseed * 3 < lora, (kseed, lora)
    replay = r"FedKSeed replay .*?median ([0-9.]+) s, max ([0-9.]+) s over (\d+) replays, (\d+) of 4096 seeds"
    m = re.search(replay, text)
    assert m and float(m.group(2)) >= float(m.group(1)) >= 0 and int(m.group(3)) >= 2 and int(m.group(4)) > 0, text

    # Personalised FedLoRA: its classifier stays home, so it moves less than FedLoRA; a row per party, both ways.
    assert _bytes(cell["personalised FedLoRA"]["bytes up+down per party per round"]) < lora
    header, rows = table(text, "party")
    assert header[2:4] == ["global part acc", "personalised acc"]
    assert sorted(r[0] for r in rows) == ["default/p0", "default/p1"]  # --smoke: 2 parties
    for r in rows:
        assert all(0.0 <= float(a) <= 1.0 for a in r[2:4]) and all(float(x) > 0 for x in r[4:6]), r

    # Offsite tuning: the emulator's accuracy in its row; the plugged-in full model evaluated beside it; a party
    # downloaded the emulator only (3 of the 4 layers), less than the full model; whole layers travel, not LoRA.
    m = re.search(
        r"offsite tuning: the row is the emulator's accuracy, the plugged-in full model's is ([0-9.]+) \(eval loss "
        r"([0-9.]+)\).*?downloaded the emulator, ([0-9.]+ [KM]?B) of weights, against the full model's ([0-9.]+ "
        r"[KM]?B) \((\d+)%\)",
        text,
    )
    assert m, text
    assert 0.0 <= float(m.group(1)) <= 1.0 and float(m.group(2)) > 0
    assert _bytes(m.group(3)) < _bytes(m.group(4)) and int(m.group(5)) < 100
    assert _bytes(cell["offsite tuning"]["bytes up+down per party per round"]) > lora
