"""The party trainer: a long-lived process answering tickets from its mailbox.

The base model is loaded once per job and kept; each train ticket resets the adapter to the
received global weights, evaluates it on the local eval split, trains, and uploads the update.
A pod with several ranks (one per GPU, fedtune_trainer.ranks) runs this on each of them: rank 0
reads the mailbox, downloads and uploads; every rank loads the model, evaluates its share of the
eval split and trains its share of each step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from datetime import UTC
from typing import Any, get_args

from fedtune.api import cpu_slots
from fedtune.api.mailbox import POLL_SECONDS, ticket_id
from fedtune.api.protocol import Download, TicketKind, TrainerConfig, TrainerReceipt, TrainerTicket, Upload
from fedtune.api.status import Metrics, utcnow
from pydantic import ValidationError

from fedtune_trainer import secure_party, transfer
from fedtune_trainer.mailbox import Mailbox, answers, as_int, deliver, open_mailbox, own_receipt
from fedtune_trainer.ranks import SOLO, Ranks, from_env

log = logging.getLogger(__name__)
PRELOADED: PartyRuntime | None = None  # set by the zygote (local mode) before it forks this process
_URL = re.compile(r"https?://[^\s'\"]+")


class PartyRuntime:
    """What a trainer keeps between tickets: the loaded model, its fingerprint, parsed data."""

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.teacher: Any = None  # training.distillation's frozen teacher, loaded with the model
        self.fingerprint: str | None = None
        self.initial: dict | None = None  # the freshly initialised adapter (global 0)
        self._key: str | None = None
        self._placed = False
        self._data: dict[tuple[str, str, str | None], list[dict]] = {}
        self.secure = secure_party.Sessions()  # secure aggregation's secrets of the current round
        # privacy.dpSgd: the Opacus accountant of each job, kept across rounds so that their steps compose.
        self.sample_accountants: dict[str, Any] = {}
        # personalization: each job's personal part as last written to the party's bucket (sha256, tensors).
        self.personal: dict[str, tuple[str, dict]] = {}

    def personal_names(self, cfg: TrainerConfig) -> set[str]:
        """The adapter tensors this job keeps personal (empty without spec.personalization)."""
        from fedtune_trainer.personal import head_modules, personal_names

        if cfg.personalization is None:
            return set()
        return personal_names(self.initial, cfg.personalization, head_modules(self.model))

    def own_part(self, ticket: TrainerTicket, receipt: TrainerReceipt) -> dict:
        """Rank 0: this party's personal part: kept in memory, else read back from its own bucket (a restarted
        pod), else the initial one (its first round)."""
        from fedtune_trainer.adapters import from_bytes
        from fedtune_trainer.personal import split

        src = ticket.personal_in
        if src is None:
            return split(self.initial, self.personal_names(ticket.config))[1]
        kept = self.personal.get(ticket.job)
        if kept is not None and kept[0] == src.sha256:
            return kept[1]
        start = time.perf_counter()
        raw = transfer.get(src.url, src.sha256)
        receipt.bytes_down += len(raw)
        receipt.timings.download_seconds += time.perf_counter() - start
        own = from_bytes(raw)
        self.personal[ticket.job] = (src.sha256, own)
        return own

    def sample_accountant(self, job: str) -> Any:
        """The job's sample-level accountant (created at the party's first DP-SGD round of the job)."""
        from fedtune_trainer.dpsgd import new_accountant

        if job not in self.sample_accountants:
            self.sample_accountants[job] = new_accountant()
        return self.sample_accountants[job]

    @staticmethod
    def model_key(cfg: TrainerConfig) -> str:
        """What decides the model's weights and tokenization (not the per-round URLs)."""
        doc = {
            "model": cfg.model.to_wire(),
            "peft": cfg.peft.to_wire(),
            "data": cfg.data.to_wire(),
            "seed": cfg.training.seed,
            "bf16": cfg.deepspeed.enabled and cfg.deepspeed.bf16,
            "checkpointing": cfg.training.gradient_checkpointing,
            "files": sorted(cfg.model_files),
            "teacher": cfg.training.distillation.teacher if cfg.training.distillation else None,
        }
        return json.dumps(doc, sort_keys=True)

    def ensure(self, cfg: TrainerConfig, place: bool = True) -> float:
        """Load model and adapter unless this config's are already loaded, and (`place`) put them on
        the pod's device; returns seconds spent. The zygote loads without placing: a CUDA context
        does not survive a fork, so each forked pod moves the model itself at its first ticket."""
        from fedtune_trainer.adapters import adapter_state
        from fedtune_trainer.device import pick_device
        from fedtune_trainer.models import apply_peft, enable_gradient_checkpointing, fingerprint, load_base_model

        key = self.model_key(cfg)
        start = time.perf_counter()
        loaded = key != self._key
        if loaded:
            quantized = cfg.model.quantization is not None
            if quantized and not place:
                return 0.0  # bitsandbytes quantises onto the device while loading: the pod loads it there
            self.model = self.tokenizer = self.teacher = self._key = None
            self._data.clear()  # tokenization may have changed with the config
            # DeepSpeed bf16 casts the whole module; loading the base in bf16 keeps that cast lossless.
            dtype = "bfloat16" if cfg.deepspeed.enabled and cfg.deepspeed.bf16 else None
            seed = cfg.training.seed
            # Placed before its check forward pass; a DeepSpeed engine places the model itself.
            device = pick_device() if place and not cfg.deepspeed.enabled else None
            base, self.tokenizer = load_base_model(
                cfg.model, cfg.data, seed, cfg.model_files, dtype=dtype, device=device
            )
            self.fingerprint = fingerprint(base)
            kd = cfg.training.distillation
            if kd is not None:
                from fedtune_trainer.distill import load_teacher

                self.teacher = load_teacher(cfg.model, cfg.data, kd, self.tokenizer, device)
                # Parties must distil from the same teacher as well: its fingerprint joins the base model's.
                both = f"{self.fingerprint}|{fingerprint(self.teacher)}"
                self.fingerprint = hashlib.sha256(both.encode()).hexdigest()
            self.model = apply_peft(base, cfg.peft, cfg.model.task, seed, device)
            if cfg.training.gradient_checkpointing:
                enable_gradient_checkpointing(self.model)
            self.initial = adapter_state(self.model)
            self._key, self._placed = key, device is not None
        # A model the zygote loaded (place=False) is placed at this pod's first ticket.
        placing = place and not self._placed and not cfg.deepspeed.enabled
        if placing:
            self.model.to(pick_device())
            if self.teacher is not None:
                self.teacher.to(pick_device())
            self._placed = True
        return time.perf_counter() - start if loaded or placing else 0.0

    def examples(self, job: str, source: Download, cfg: TrainerConfig, receipt: TrainerReceipt) -> list[dict]:
        """A data file's examples, downloaded and parsed once per job (keyed by URL path, not signature)."""
        from fedtune_trainer.data import load_examples

        key = (job, transfer.redact(source.url), source.sha256)  # the signature changes per ticket; the path does not
        if key not in self._data:
            start = time.perf_counter()
            raw = transfer.get(source.url, source.sha256)
            receipt.bytes_down += len(raw)
            receipt.timings.download_seconds += time.perf_counter() - start
            name = key[1].rsplit("/", 1)[-1]
            self._data[key] = load_examples(raw, cfg.data, cfg.model.task, self.tokenizer, source=name)
        return self._data[key]


def _download_global(ticket: TrainerTicket, receipt: TrainerReceipt) -> dict:
    """Rank 0: the tensors of the global adapter the ticket names."""
    from fedtune_trainer.adapters import from_bytes

    if ticket.global_in is None:
        raise ValueError(f"{ticket.kind} ticket carries no globalIn adapter")
    start = time.perf_counter()
    raw = transfer.get(ticket.global_in.url, ticket.global_in.sha256)
    receipt.bytes_down += len(raw)
    receipt.timings.download_seconds += time.perf_counter() - start
    return from_bytes(raw)


def _load_global(rt: PartyRuntime, tensors: dict, ranks: Ranks) -> None:
    """Every rank: reset the adapter to the global one (under ZeRO-3 a collective: fedtune_trainer.engines)."""
    from fedtune_trainer.adapters import check_adapter_state, load_adapter_state

    with ranks.together():
        check_adapter_state(rt.model, tensors)  # the same verdict on every rank: same model, same tensors
    with ranks.lockstep("loading the global adapter"):
        load_adapter_state(rt.model, tensors)


def _eval_examples(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt) -> list[dict] | None:
    """Rank 0: the examples evaluation runs on (None without an eval split)."""
    if ticket.eval_data is None:
        return None
    return rt.examples(ticket.job, ticket.eval_data, ticket.config, receipt)[: ticket.config.training.max_eval_samples]


def _evaluate(
    ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, data: list[dict] | None, ranks: Ranks
) -> Metrics:
    """Every rank: the metrics of the loaded adapter on `data`, each rank evaluating its share."""
    from fedtune_trainer.engines import forward_engine
    from fedtune_trainer.evaluate import evaluate

    cfg = ticket.config
    if data is None:
        return Metrics()
    start = time.perf_counter()
    with ranks.lockstep("evaluating"), forward_engine(rt.model, cfg):
        metrics = evaluate(
            rt.model,
            data,
            cfg.model.task,
            cfg.training.eval_batch_size,
            rt.tokenizer.pad_token_id,
            cfg.training.precision,
            ranks,
        )
    receipt.timings.eval_seconds = time.perf_counter() - start
    receipt.num_eval_samples = len(data)
    return metrics


def _upload(target: str | Upload, data: bytes, receipt: TrainerReceipt) -> str:
    start = time.perf_counter()
    digest = transfer.put(target, data)  # in parts when the control plane made it a multipart upload
    receipt.bytes_up += len(data)
    receipt.timings.upload_seconds += time.perf_counter() - start
    return digest


def _fedkseed(cfg: TrainerConfig) -> dict | None:
    """FedKSeed's parameters (peft.config with defaults), or None for any other method."""
    from fedtune.api.methods import FEDKSEED, fedkseed_params

    return fedkseed_params(cfg.peft.config) if cfg.peft.method == FEDKSEED else None


def _replay(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, global_state: dict) -> None:
    """FedKSeed: set the model to the global by replaying its accumulated steps onto the kept base weights."""
    from fedtune_trainer import fedkseed

    ks = _fedkseed(ticket.config)
    accum = global_state.get(fedkseed.ACCUM)
    if not fedkseed.is_global(global_state) or accum.shape != (ks["seeds"],):
        raise ValueError(f"global is not a FedKSeed accumulator of {ks['seeds']} seeds")
    start = time.perf_counter()
    fedkseed.replay(rt.model, rt.initial, accum, ticket.config.training.seed, ks["learningRate"])
    receipt.timings.replay_seconds = time.perf_counter() - start
    receipt.replayed_sha256 = fedkseed.weights_digest(rt.model)
    log.info(
        "[%s] round %d: replayed %d of %d seeds onto the base model in %.2fs (weights %s)",
        ticket.party,
        ticket.round,
        int((accum != 0).sum()),
        ks["seeds"],
        receipt.timings.replay_seconds,
        receipt.replayed_sha256[:12],
    )


def _train_fedkseed(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, ranks: Ranks) -> None:
    """FedKSeed's round: replay the global, evaluate it, take the local zeroth-order steps, upload (i, g) pairs."""
    from fedtune_trainer import fedkseed
    from fedtune_trainer.adapters import to_bytes

    cfg, ks = ticket.config, _fedkseed(ticket.config)
    train, global_state, evals, _ = ranks.share(lambda: _fetch_round(ticket, rt, receipt))
    _replay(ticket, rt, receipt, global_state)
    with cpu_slots.hold():
        metrics = _evaluate(ticket, rt, receipt, evals, ranks)
        steps = fedkseed.train_steps(
            rt.model,
            train,
            rt.tokenizer.pad_token_id,
            job_seed=cfg.training.seed,
            rnd=ticket.round,
            party=ticket.party,
            k=ks["seeds"],
            steps=ks["steps"],
            lr=ks["learningRate"],
            eps=ks["epsilon"],
            batch_size=cfg.training.batch_size,
        )
    if not ranks.lead:
        return
    update = to_bytes(fedkseed.update_tensors(steps.seeds, steps.grads))
    metrics.train_loss = steps.train_loss
    receipt.metrics, receipt.num_samples = metrics, steps.num_samples
    receipt.timings.train_seconds = steps.seconds
    receipt.sha256, receipt.update_bytes = _upload(ticket.update_out, update, receipt), len(update)
    log.info(
        "[%s] round %d: global eval_loss=%s accuracy=%s | %d zeroth-order steps, train_loss=%.4f in %.1fs "
        "(replay %.2fs), update %d bytes",
        ticket.party,
        ticket.round,
        _fmt(metrics.eval_loss),
        _fmt(metrics.eval_accuracy),
        len(steps.seeds),
        steps.train_loss,
        steps.seconds,
        receipt.timings.replay_seconds,
        len(update),
    )


def _init(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, ranks: Ranks = SOLO) -> None:
    from fedtune_trainer.adapters import adapter_config_json, model_files_bundle, to_bytes

    if not ranks.lead:
        return  # the model is loaded; the data reaches the other ranks with each train ticket
    # Reading the data now turns a schema mistake into an init failure, not a round-1 failure.
    if ticket.train_data is not None:
        receipt.num_samples = len(rt.examples(ticket.job, ticket.train_data, ticket.config, receipt))
    if ticket.eval_data is not None:
        receipt.num_eval_samples = len(rt.examples(ticket.job, ticket.eval_data, ticket.config, receipt))
    personal = rt.personal_names(ticket.config)  # a pattern matching nothing fails the init, naming the field
    if ticket.update_out:
        # Global 0 holds the shared part only; every party starts from its own initial personal part.
        initial = to_bytes({k: v for k, v in rt.initial.items() if k not in personal})
        if (ks := _fedkseed(ticket.config)) is not None:  # the global is the per-seed accumulator, all zeros
            from fedtune_trainer.fedkseed import global0

            initial = to_bytes(global0(ks["seeds"]))
        receipt.sha256, receipt.update_bytes = _upload(ticket.update_out, initial, receipt), len(initial)
    if ticket.adapter_config_out:
        _upload(ticket.adapter_config_out, adapter_config_json(rt.model, ticket.config.model.portable_name), receipt)
    if ticket.model_files_out:  # full fine-tuning: the final model's config and tokenizer files
        _upload(ticket.model_files_out, model_files_bundle(rt.model, rt.tokenizer), receipt)
    log.info("[%s] initialised: base model %s", ticket.party, rt.fingerprint[:12])


def _fetch_round(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt) -> tuple:
    """Rank 0: what every rank needs for a train ticket: training examples, global adapter, eval examples,
    and (personalization) this party's personal part."""
    train = rt.examples(ticket.job, ticket.train_data, ticket.config, receipt)
    global_state, evals = _download_global(ticket, receipt), _eval_examples(ticket, rt, receipt)
    own = rt.own_part(ticket, receipt) if ticket.config.personalization is not None else None
    return train, global_state, evals, own


def _evaluate_personal(
    ticket: TrainerTicket,
    rt: PartyRuntime,
    receipt: TrainerReceipt,
    global_state: dict,
    own: dict,
    evals: list[dict] | None,
    ranks: Ranks,
) -> tuple[Metrics, dict]:
    """Every rank: the global part evaluated with the initial personal part (global*), then with this party's
    own (eval*, the personalised adapter); leaves the personalised adapter loaded and returns it."""
    from fedtune_trainer.personal import merge, split

    initial_own = split(rt.initial, rt.personal_names(ticket.config))[1]
    _load_global(rt, merge(global_state, initial_own), ranks)
    base = _evaluate(ticket, rt, receipt, evals, ranks)
    mine = merge(global_state, own)
    _load_global(rt, mine, ranks)
    metrics = _evaluate(ticket, rt, receipt, evals, ranks)
    metrics.global_eval_loss, metrics.global_eval_accuracy = base.eval_loss, base.eval_accuracy
    return metrics, mine


def _keep_personal(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, own: dict) -> None:
    """Rank 0: write the personal part to the party's own bucket (the only place it goes) and keep it in memory."""
    from fedtune_trainer.adapters import to_bytes

    if not ticket.personal_out:
        raise ValueError(f"{ticket.kind} ticket carries no personalOut (spec.personalization is set)")
    digest = _upload(ticket.personal_out, to_bytes(own), receipt)
    rt.personal[ticket.job] = (digest, own)
    receipt.personal_sha256 = digest


def _train(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, ranks: Ranks = SOLO) -> None:
    from fedtune_trainer.adapters import adapter_state
    from fedtune_trainer.compression import encode
    from fedtune_trainer.privacy import noise_generator, privatise_update
    from fedtune_trainer.train import train_local

    cfg = ticket.config
    if ticket.train_data is None or not ticket.update_out:
        raise ValueError("train ticket needs trainData and updateOut")
    if _fedkseed(cfg) is not None:
        _train_fedkseed(ticket, rt, receipt, ranks)
        return
    if ticket.secure is not None and ranks.lead:  # the shares dealt to this party, before the work of training
        secure_party.receive(ticket, rt.secure, receipt)
    train, global_state, evals, own = ranks.share(lambda: _fetch_round(ticket, rt, receipt))
    personal = rt.personal_names(cfg)
    loaded = global_state
    if not personal:
        _load_global(rt, global_state, ranks)
    # Local mode: no more parties compute at once than there are cores (one-rank parties only: the
    # runner sets no slots when a party has several ranks, which must not wait for one another).
    with cpu_slots.hold():
        if personal:  # the global part and this party's own, merged: the personalised adapter trains
            metrics, loaded = _evaluate_personal(ticket, rt, receipt, global_state, own, evals, ranks)
        else:
            metrics = _evaluate(ticket, rt, receipt, evals, ranks)
        with ranks.lockstep(f"training round {ticket.round}"):
            accountant = rt.sample_accountant(ticket.job) if cfg.dp_sgd is not None else None
            result = train_local(
                rt.model,
                train,
                cfg,
                None,
                cfg.training.seed,
                ticket.round,
                rt.tokenizer.pad_token_id,
                ranks,
                accountant,
                teacher=rt.teacher,
            )
            state = adapter_state(rt.model, like=loaded)  # on every rank: under ZeRO-3 it is gathered
        if not ranks.lead:
            return  # every rank holds the same adapter now; rank 0 uploads it
        if personal:  # the personal part stays here; the update is the shared part alone
            from fedtune_trainer.personal import split

            state, own = split(state, personal)
            _keep_personal(ticket, rt, receipt, own)
        if cfg.dp is not None:  # local differential privacy: no update leaves the party without its noise
            state, norm = privatise_update(
                global_state, state, cfg.dp.clip_norm, cfg.dp.noise_multiplier, noise_generator()
            )
            log.info(
                "[%s] round %d: update norm %.4g clipped to %g, noise added",
                ticket.party,
                ticket.round,
                norm,
                cfg.dp.clip_norm,
            )
        if ticket.secure is not None:  # the aggregator sees only the sum of the masked updates
            update = secure_party.masked_update(ticket, rt.secure, global_state, state, result.num_samples)
        else:
            update = encode(state, cfg.training.update_compression)  # the aggregator decodes it
    metrics.train_loss = result.train_loss
    metrics.train_distill_loss = result.distill_loss
    if result.distill_loss is not None:
        kd = cfg.training.distillation
        log.info(
            "[%s] round %d: distillation: cross-entropy %.4f, T²·KL to the teacher %.4f (alpha %g, T %g)",
            ticket.party,
            ticket.round,
            result.train_loss,
            result.distill_loss,
            kd.alpha,
            kd.temperature,
        )
    receipt.metrics, receipt.num_samples = metrics, result.num_samples
    if cfg.dp_sgd is not None:
        from fedtune_trainer.dpsgd import epsilon

        receipt.sample_epsilon = epsilon(accountant, cfg.dp_sgd)
        log.info(
            "[%s] round %d: DP-SGD, sample-level ε=%.3f at δ=%g over all rounds trained",
            ticket.party,
            ticket.round,
            receipt.sample_epsilon,
            cfg.dp_sgd.delta,
        )
    receipt.timings.train_seconds = result.seconds
    receipt.sha256, receipt.update_bytes = _upload(ticket.update_out, update, receipt), len(update)
    if personal:
        log.info(
            "[%s] round %d: personalised accuracy=%s, global part with the initial personal part accuracy=%s",
            ticket.party,
            ticket.round,
            _fmt(metrics.eval_accuracy),
            _fmt(metrics.global_eval_accuracy),
        )
    log.info(
        "[%s] round %d: global eval_loss=%s accuracy=%s | local train_loss=%.4f on %d examples in %.1fs",
        ticket.party,
        ticket.round,
        _fmt(metrics.eval_loss),
        _fmt(metrics.eval_accuracy),
        result.train_loss,
        result.num_samples,
        result.seconds,
    )


def _secure(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, ranks: Ranks = SOLO) -> None:
    """Secure aggregation's keys, shares and unmask exchanges: rank 0's alone (fedtune_trainer.secure_party)."""
    if not ranks.lead:
        return
    if ticket.secure is None:
        raise ValueError(f"{ticket.kind} ticket carries no secure block")
    if ticket.kind == "keys":
        secure_party.advertise(ticket, rt.secure, receipt)
    elif ticket.kind == "shares":
        secure_party.deal(ticket, rt.secure, receipt, _upload)
    else:
        secure_party.reveal(ticket, rt.secure, receipt, _upload)
    log.info("[%s] round %d: secure aggregation: %s done", ticket.party, ticket.round, ticket.kind)


def _fetch_eval(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt) -> tuple:
    """Rank 0: what every rank needs for an eval ticket: eval examples (downloaded first), global adapter,
    and (personalization) this party's personal part."""
    if ticket.eval_data is None:
        raise ValueError("eval ticket needs evalData")
    evals = _eval_examples(ticket, rt, receipt)
    own = rt.own_part(ticket, receipt) if ticket.config.personalization is not None else None
    return evals, _download_global(ticket, receipt), own


def _eval(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, ranks: Ranks = SOLO) -> None:
    evals, global_state, own = ranks.share(lambda: _fetch_eval(ticket, rt, receipt))
    personal = rt.personal_names(ticket.config)
    if personal:
        with cpu_slots.hold():
            receipt.metrics, _ = _evaluate_personal(ticket, rt, receipt, global_state, own, evals, ranks)
        if ranks.lead:  # the final personal part, at a fixed key of the party's own bucket
            _keep_personal(ticket, rt, receipt, own)
    else:
        if _fedkseed(ticket.config) is not None:
            _replay(ticket, rt, receipt, global_state)
        else:
            _load_global(rt, global_state, ranks)
        with cpu_slots.hold():
            receipt.metrics = _evaluate(ticket, rt, receipt, evals, ranks)
    if ranks.lead:
        log.info(
            "[%s] eval of global %d: loss=%s accuracy=%s perplexity=%s",
            ticket.party,
            ticket.round,
            _fmt(receipt.metrics.eval_loss),
            _fmt(receipt.metrics.eval_accuracy),
            _fmt(receipt.metrics.eval_perplexity),
        )


def _fetch_model(cfg: TrainerConfig) -> None:
    """Rank 0: download s3:// model files into the pod's cache, where the other ranks then find them."""
    from fedtune_trainer.models import resolve_source

    resolve_source(cfg.model, cfg.model_files)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def describe(exc: BaseException) -> str:
    """A one-line reason for a receipt, with every URL's signature removed."""
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ValueError, transfer.TransferError)) else str(exc)
    return _URL.sub(lambda m: transfer.redact(m.group(0)), text)


def handle(ticket: TrainerTicket, rt: PartyRuntime, ranks: Ranks = SOLO) -> TrainerReceipt:
    """Do one ticket's work and say how it went; failures become ok=False receipts, never exceptions.

    With several ranks every rank calls this for the ticket rank 0 handed out, and each rank's
    receipt but rank 0's is dropped. A failure during training ends the process (Ranks.lockstep).
    """
    receipt = TrainerReceipt(
        kind=ticket.kind, job=ticket.job, party=ticket.party, round=ticket.round, attempt=ticket.attempt, ok=True
    )
    try:
        if ticket.kind != "exit":
            with ranks.together():  # every rank fails the ticket, or none: one alone would wait for the others
                deadline = ticket.deadline if ticket.deadline.tzinfo else ticket.deadline.replace(tzinfo=UTC)
                if utcnow() > deadline:
                    raise TimeoutError(f"ticket {ticket.ticket_id} reached the trainer after its deadline {deadline}")
                if ranks.world > 1 and ranks.lead:
                    _fetch_model(ticket.config)
            with ranks.together():
                receipt.timings.load_seconds = rt.ensure(ticket.config)
            receipt.base_model_fingerprint = rt.fingerprint
            work = {"init": _init, "train": _train, "eval": _eval}.get(ticket.kind, _secure)
            work(ticket, rt, receipt, ranks)
    except Exception as exc:  # the control plane decides what a failure means; the pod stays up
        log.error("[%s] %s failed: %s", ticket.party, ticket.ticket_id, describe(exc))
        receipt.ok, receipt.error = False, describe(exc)
        # An object store out of reach is not this party's failure: the control plane waits for it.
        receipt.fault = "storage" if isinstance(exc, transfer.StorageFailure) else "pod"
    receipt.finished_at = utcnow()
    return receipt


def _raw_receipt(raw: dict[str, Any], ok: bool, error: str | None = None) -> TrainerReceipt:
    """A receipt for a ticket that could not be parsed (or a terse exit ticket)."""
    kind = raw.get("kind") if raw.get("kind") in get_args(TicketKind) else "exit"
    return TrainerReceipt(
        kind=kind,
        job=str(raw.get("job", "")),
        party=str(raw.get("party", "")),
        round=as_int(raw.get("round"), -1),
        attempt=as_int(raw.get("attempt"), 0),
        ok=ok,
        error=error,
        finished_at=utcnow(),
    )


def _configure_threads() -> None:
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))  # the runner sizes parties to share the machine


def serve(mailbox_uri: str, poll: float = POLL_SECONDS) -> int:
    """Answer tickets from the mailbox at `mailbox_uri` until an exit ticket; returns 0.

    Under torchrun (several ranks) rank 0 does so and the other ranks follow it.
    """
    _configure_threads()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor loading bars would drown the round log
    except ImportError:
        pass
    ranks, rt = from_env(), PRELOADED or PartyRuntime()
    code = _lead(open_mailbox(mailbox_uri), rt, ranks, poll) if ranks.lead else _follow(rt, ranks)
    ranks.close()
    return code


def _follow(rt: PartyRuntime, ranks: Ranks) -> int:
    """A rank other than 0: take each ticket rank 0 hands out and do this rank's part, until an exit ticket."""
    while True:
        raw = ranks.next_ticket()
        if raw.get("kind") == "exit":
            log.info("[%s] rank %d: exit ticket: stopping", raw.get("party", "?"), ranks.rank)
            return 0
        ticket = TrainerTicket.model_validate(raw)  # rank 0 validated it already
        log.info("[%s] rank %d: ticket %s from rank 0", ticket.party, ranks.rank, ticket.ticket_id)
        handle(ticket, rt, ranks)


def _lead(mailbox: Mailbox, rt: PartyRuntime, ranks: Ranks, poll: float) -> int:
    """Rank 0 (the only rank of a one-process pod): answer tickets from the mailbox until an exit ticket."""
    last: str | None = None
    while True:
        raw = mailbox.wait_ticket(newer_than=last, poll=poll)
        last = ticket_id(raw)
        answered = answers(own_receipt(mailbox), raw)
        if raw.get("kind") == "exit":
            ranks.hand_out(raw)
            if not answered:
                deliver(mailbox, _raw_receipt(raw, ok=True), raw.get("receiptOut"))
            log.info("[%s] exit ticket: stopping", raw.get("party", "?"))
            return 0
        if answered:
            log.info("[%s] ticket %s was answered before a restart; waiting for the next", raw.get("party"), last)
            continue
        try:
            ticket = TrainerTicket.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            receipt, receipt_out = _raw_receipt(raw, ok=False, error=f"invalid trainer ticket: {problems}"), None
        else:
            log.info("[%s] ticket %s", ticket.party, last)
            ranks.hand_out(raw)
            receipt, receipt_out = handle(ticket, rt, ranks), ticket.receipt_out
        deliver(mailbox, receipt, receipt_out)
