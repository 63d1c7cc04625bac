"""What a party keeps between tickets (PartyRuntime): the loaded model and adapter, their fingerprint,
the parsed data of each job, and the per-job state that outlives a round (secure aggregation's
secrets, DP-SGD's accountants, personalised parts)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from fedtune.api.protocol import Download, TrainerConfig, TrainerReceipt, TrainerTicket

from fedtune_trainer import secure_party, transfer


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
