"""Secure aggregation (fedtune_trainer.secagg): the masked sum is exact, single updates look random,
dropouts before and after upload are recovered, and tampered or replayed shares are refused."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from fedtune_trainer.secagg import (
    FRACTION_BITS,
    Context,
    PartyKeys,
    PublicKeys,
    SecAggError,
    ShareRejected,
    deal,
    dequantise,
    mask,
    open_shares,
    quantise,
    reveal,
    unmask,
)
from fedtune_trainer.secagg.context import label
from fedtune_trainer.secagg.keys import hkdf, prg

NAMES = ["alice", "bob", "carol", "dave", "erin"]


class Round:
    """One round's key and share phases, run for real between `names`."""

    def __init__(self, ctx: Context, names=NAMES, threshold=3):
        self.ctx, self.names, self.t = ctx, list(names), threshold
        self.keys = {n: PartyKeys.generate() for n in self.names}
        self.roster = {n: self.keys[n].public() for n in self.names}
        dealt = {n: deal(ctx, n, self.keys[n], self.roster, threshold) for n in self.names}
        self.objects = {n: obj for n, (obj, _) in dealt.items()}
        self.seeds = {n: seed for n, (_, seed) in dealt.items()}
        self.held = {n: open_shares(ctx, n, self.keys[n], self.roster, self.objects) for n in self.names}

    def mask(self, name, vector):
        return mask(self.ctx, name, self.keys[name], self.seeds[name], self.roster, vector)

    def reveal(self, name, survivors, dropped):
        return reveal(self.ctx, name, self.held[name], survivors, dropped, self.t)

    def unmask(self, masked, dropped, reveals):
        return unmask(self.ctx, masked, self.roster, dropped, self.objects, reveals, self.t)


def quantised_sum(vectors):
    vectors = list(vectors)
    total = np.zeros_like(vectors[0])
    for v in vectors:
        np.add(total, v, out=total)
    return total


def edit(data: bytes, change) -> bytes:
    obj = json.loads(data)
    change(obj)
    return json.dumps(obj).encode()


def flip(text: str, at: int = 20) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[at] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_the_unmasked_sum_is_the_weighted_mean():
    rng = np.random.default_rng(1)
    r = Round(Context("job-a", 3, 0))
    updates = {n: rng.normal(scale=0.01, size=20_000) for n in NAMES}
    weights = dict(zip(NAMES, [1.0, 2.5, 0.3, 7.0, 4.0]))
    masked = {n: r.mask(n, quantise(updates[n], weights[n], len(NAMES))) for n in NAMES}
    reveals = {n: r.reveal(n, NAMES, []) for n in NAMES}
    total, rejected = r.unmask(masked, [], reveals)
    assert rejected == {}
    weight_sum = sum(weights.values())
    got = dequantise(total, weight_sum)
    want = sum(weights[n] * updates[n] for n in NAMES) / weight_sum
    bound = len(NAMES) * 0.5 / 2**FRACTION_BITS / weight_sum
    assert np.max(np.abs(got - want)) <= bound * (1 + 1e-9)
    # And the weights matter: the plain mean is far from it.
    assert np.max(np.abs(got - np.mean([updates[n] for n in NAMES], axis=0))) > 100 * bound


def test_a_masked_update_looks_random_but_the_sum_is_exact():
    rng = np.random.default_rng(2)
    r = Round(Context("job-a", 1, 0))
    plain = {n: rng.normal(size=100_000) for n in NAMES}
    quantised = {n: quantise(plain[n], 1.0, len(NAMES)) for n in NAMES}
    masked = {n: r.mask(n, quantised[n]) for n in NAMES}
    one = masked["carol"]
    assert abs(np.corrcoef(one.view(np.int64).astype(np.float64), plain["carol"])[0, 1]) < 0.05
    # Unmasked, the same statistic is ~1: the test can tell.
    assert np.corrcoef(quantised["carol"].view(np.int64).astype(np.float64), plain["carol"])[0, 1] > 0.99
    bits = np.unpackbits(one.view(np.uint8)).reshape(-1, 64).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 0.01), bits
    total, rejected = r.unmask(masked, [], {n: r.reveal(n, NAMES, []) for n in NAMES[:3]})
    assert rejected == {}
    assert np.array_equal(total, quantised_sum(quantised.values()))


def test_a_party_that_drops_after_uploading_is_still_summed():
    rng = np.random.default_rng(3)
    r = Round(Context("job-a", 2, 0))
    quantised = {n: quantise(rng.normal(size=5000), 1.0, 5) for n in NAMES}
    masked = {n: r.mask(n, quantised[n]) for n in NAMES}
    # erin uploaded, then went away: no reveal from her; the others reveal her b-share.
    reveals = {n: r.reveal(n, NAMES, []) for n in NAMES if n != "erin"}
    total, rejected = r.unmask(masked, [], reveals)
    assert rejected == {}
    assert np.array_equal(total, quantised_sum(quantised.values()))


def test_a_party_that_drops_before_uploading_has_its_pairwise_masks_removed():
    rng = np.random.default_rng(4)
    r = Round(Context("job-a", 2, 1))
    quantised = {n: quantise(rng.normal(size=5000), 1.0, 5) for n in NAMES}
    survivors, dropped = NAMES[:4], ["erin"]
    masked = {n: r.mask(n, quantised[n]) for n in survivors}
    reveals = {n: r.reveal(n, survivors, dropped) for n in survivors[:3]}
    assert all(json.loads(reveals[n])["s"].keys() == {"erin"} for n in reveals)
    total, rejected = r.unmask(masked, dropped, reveals)
    assert rejected == {}
    assert np.array_equal(total, quantised_sum(quantised[n] for n in survivors))
    # erin must be accounted for: her pairwise masks are in the others' uploads.
    with pytest.raises(SecAggError, match="together be the roster"):
        r.unmask(masked, [], reveals)


def test_fewer_than_t_survivors_or_valid_reveals_is_refused():
    r = Round(Context("job-a", 5, 0), threshold=3)
    with pytest.raises(SecAggError, match="fewer than t survivors"):
        r.reveal("alice", ["alice", "bob"], ["carol", "dave", "erin"])
    quantised = {n: quantise(np.ones(100), 1.0, 5) for n in NAMES}
    masked = {n: r.mask(n, quantised[n]) for n in NAMES}
    reveals = {n: r.reveal(n, NAMES, []) for n in ["alice", "bob"]}
    with pytest.raises(SecAggError, match=r"survivor alice: 2 valid shares, 3 needed"):
        r.unmask(masked, [], reveals)


def test_tampered_and_replayed_share_objects_are_rejected_when_opened():
    old = Round(Context("job-a", 6, 0))
    r = Round(Context("job-a", 7, 0))
    tampered = dict(r.objects)
    tampered["bob"] = edit(r.objects["bob"], lambda o: o["ciphertexts"].update(alice=flip(o["ciphertexts"]["alice"])))
    with pytest.raises(ShareRejected, match="bob.*tampered or not addressed to me") as e:
        open_shares(r.ctx, "alice", r.keys["alice"], r.roster, tampered)
    assert e.value.party == "bob"
    for replay in (old.objects["bob"], Round(Context("job-a", 7, 1)).objects["bob"]):
        with pytest.raises(ShareRejected, match="bob is replayed from round [67] attempt [01]"):
            open_shares(r.ctx, "alice", r.keys["alice"], r.roster, {**r.objects, "bob": replay})
    # A replay relabelled with this round fails authentication (the round is in the AEAD's associated data).
    relabelled = edit(old.objects["bob"], lambda o: o.update(round=7))
    with pytest.raises(ShareRejected, match="bob"):
        open_shares(r.ctx, "alice", old.keys["alice"], old.roster, {"bob": relabelled})


def test_tampered_and_replayed_revealed_shares_are_skipped_and_the_sum_survives():
    rng = np.random.default_rng(7)
    names = [*NAMES, "frank", "gina"]
    old = Round(Context("job-a", 8, 0), names)
    r = Round(Context("job-a", 9, 0), names)
    quantised = {n: quantise(rng.normal(size=1000), 1.0, 7) for n in names}
    survivors, dropped = names[:6], ["gina"]
    masked = {n: r.mask(n, quantised[n]) for n in survivors}
    reveals = {n: r.reveal(n, survivors, dropped) for n in survivors}
    old_bob = json.loads(old.reveal("bob", survivors, dropped))
    reveals["alice"] = edit(reveals["alice"], lambda o: o["b"].update(carol=flip(o["b"]["carol"], 3)))
    reveals["bob"] = edit(reveals["bob"], lambda o: o["s"].update(gina=old_bob["s"]["gina"]))
    reveals["carol"] = old.reveal("carol", survivors, dropped)  # a whole reveal from the last round
    # dave offers a b-share of the dropped gina (with her s-share that would unmask her): refused.
    gina_b = base64.b64encode(r.held["dave"]["gina"].b).decode()
    reveals["dave"] = edit(reveals["dave"], lambda o: o["b"].update(gina=gina_b))
    total, rejected = r.unmask(masked, dropped, reveals)
    assert np.array_equal(total, quantised_sum(quantised[n] for n in survivors))
    assert rejected.keys() == {"alice", "bob", "carol", "dave"}
    assert "share of carol for round 9 fails its commitment: tampered or replayed" in rejected["alice"]
    assert "share of gina for round 9 fails its commitment: tampered or replayed" in rejected["bob"]
    assert "replayed from round 8" in rejected["carol"]
    assert "reveals both shares of gina" in rejected["dave"]
    # With too many of them spoiled, the sum is refused rather than wrong.
    for holder in ("dave", "erin"):
        reveals[holder] = edit(reveals[holder], lambda o: o["b"].update(carol=flip(o["b"]["carol"], 3)))
    with pytest.raises(SecAggError, match="survivor carol: 2 valid shares, 3 needed"):
        r.unmask(masked, dropped, reveals)


def test_a_revealed_b_share_of_a_dropped_party_is_refused():
    rng = np.random.default_rng(8)
    r = Round(Context("job-a", 10, 0))
    quantised = {n: quantise(rng.normal(size=100), 1.0, 5) for n in NAMES}
    survivors, dropped = NAMES[:4], ["erin"]
    masked = {n: r.mask(n, quantised[n]) for n in survivors}
    reveals = {n: r.reveal(n, survivors, dropped) for n in survivors[:3]}
    share = base64.b64encode(r.held["dave"]["erin"].b).decode()
    reveals["dave"] = json.dumps(
        {"version": 1, "job": "job-a", "round": 10, "attempt": 0, "holder": "dave", "b": {"erin": share}, "s": {}}
    ).encode()
    total, rejected = r.unmask(masked, dropped, reveals)
    assert "b-share of erin, who is not a survivor" in rejected["dave"]
    assert np.array_equal(total, quantised_sum(quantised[n] for n in survivors))


def test_reveal_never_gives_both_shares_of_one_dealer():
    r = Round(Context("job-a", 11, 0))
    with pytest.raises(SecAggError, match=r"\['erin'\] are listed both as survivors and as dropped"):
        r.reveal("alice", NAMES, ["erin"])
    first = json.loads(r.reveal("alice", NAMES[:4], ["erin"]))
    assert set(first["b"]) == set(NAMES[:4]) and set(first["s"]) == {"erin"}
    assert not set(first["b"]) & set(first["s"])
    # Asked again with erin now a survivor: her s-share is out, so her b-share must never follow.
    with pytest.raises(SecAggError, match="already revealed the s-share of erin"):
        r.reveal("alice", NAMES, [])


def test_quantise_refuses_values_that_could_wrap_and_non_finite_values():
    limit = 2**62 / 2**FRACTION_BITS / 10
    ok = quantise(np.array([limit * 0.99, -limit * 0.99]), 1.0, 10)
    assert ok.view(np.int64)[1] < 0
    with pytest.raises(SecAggError, match=r"largest weighted value .* reaches the limit"):
        quantise(np.array([0.0, limit * 0.6]), 2.0, 10)
    with pytest.raises(SecAggError, match="non-finite value"):
        quantise(np.array([1.0, np.nan]), 1.0, 10)
    with pytest.raises(SecAggError, match="non-finite value"):
        quantise(np.array([-np.inf]), 1.0, 10)
    with pytest.raises(SecAggError, match="weight inf is not finite"):
        quantise(np.array([1.0]), float("inf"), 10)


def test_public_keys_refuse_bad_base64_and_wrong_lengths():
    good = PartyKeys.generate().public().to_dict()
    assert PublicKeys.from_dict(json.loads(json.dumps(good))) == PublicKeys(**good)
    with pytest.raises(SecAggError, match="public key 'c' is not valid base64"):
        PublicKeys.from_dict({**good, "c": "not base64!"})
    with pytest.raises(SecAggError, match="public key 's' decodes to 31 bytes, expected 32"):
        PublicKeys.from_dict({**good, "s": base64.b64encode(bytes(31)).decode()})
    with pytest.raises(SecAggError, match="exactly 'c' and 's'"):
        PublicKeys.from_dict({"c": good["c"]})


def test_the_prg_is_one_unbroken_chacha20_keystream():
    # Across the chunks it is written in: a restarted or repeated stream would still cancel in unmask.
    ctx, seed, size = Context("job-a", 1, 0), bytes(range(32)), 300_001
    key = hkdf(seed, label(ctx, b"prg"))
    want = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * size))
    assert prg(ctx, seed, size).tobytes() == want
    assert not np.array_equal(prg(ctx, seed, 1000), prg(Context("job-a", 1, 1), seed, 1000))
