"""bench/privacy.py runs end to end in its --smoke size: accuracy against ε, robust rules under an
attacking party, secure aggregation's overhead, each from real local-mode jobs."""

from __future__ import annotations

import math

from bench_smoke import machine_noted, run_smoke, table

RULES = {"mean (FedAvg)", "mean + normBound", "median", "trimmedMean (0.2)", "krum (f=1)", "multiKrum (f=1)"}


def test_privacy_smoke(tmp_path):
    text = run_smoke("privacy.py", tmp_path)
    assert "SMOKE RUN" in text and machine_noted(text) and "dp-accounting: " in text

    # 1. ε as the job's status reports it: finite, distinct, and larger for less noise.
    header, rows = table(text, "ε (δ)")
    assert header[:4] == ["ε (δ)", "noise multiplier", "clip norm", "final accuracy"]
    assert rows[0][0] == "none (no DP)"
    dp = [(float(r[1]), float(r[0].split()[0])) for r in rows[1:]]
    assert len(dp) >= 3
    sigmas, epsilons = zip(*sorted(dp, reverse=True))  # noise multiplier falling
    assert all(math.isfinite(e) and e > 0 for e in epsilons)
    assert len(set(epsilons)) == len(epsilons) and list(epsilons) == sorted(epsilons)
    assert all(r[0].endswith("(1e-05)") and float(r[2]) > 0 for r in rows[1:])
    for r in rows:
        assert 0.0 <= float(r[3]) <= 1.0
        assert all(0.0 <= float(a) <= 1.0 for a in r[4].split(" → "))

    # 2. A row per rule under the x100 attack, and the no-attack baseline.
    header, rows = table(text, "rule")
    cell = {(r[0], r[1]): dict(zip(header, r)) for r in rows}
    assert {rule for rule, attack in cell if attack == "update x100"} == RULES
    assert ("mean (FedAvg)", "none") in cell and float(
        cell[("mean (FedAvg)", "none")]["distance from honest FedAvg"]
    ) == 0
    assert all(0.0 <= float(c["final accuracy"]) <= 1.0 for c in cell.values())
    distance = {rule: float(c["distance from honest FedAvg"]) for (rule, a), c in cell.items() if a == "update x100"}
    # The attack reaches the aggregate: FedAvg's global ends far from the honest one, median's much nearer.
    assert distance["mean (FedAvg)"] > 10 and distance["median"] < distance["mean (FedAvg)"] / 5, distance
    assert distance["mean + normBound"] < distance["mean (FedAvg)"] / 5, distance

    # 3. Secure aggregation (in this build: measured, not skipped): it costs bytes over plain FedAvg.
    assert "secure aggregation: not available in this build" not in text
    header, rows = table(text, "parties")
    assert [r[0] for r in rows] == ["3"]
    assert all(float(r[i].replace(",", "")) > 0 for r in rows for i in (4, 5))
    assert all(float(r[6].replace(",", "")) > 0 for r in rows)  # the masks and shares are extra bytes
