"""`fedtune run`: one FederatedJob on this machine, with an embedded S3 server and pods as subprocesses.

The control loop is the operator's: observe mailboxes -> `advance` the pure round state machine ->
write the tickets the status asks for. Each party gets its own S3 identity and bucket; the
coordinator another. Only this process holds credentials; pods get presigned URLs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TextIO

from fedtune.api import cpu_slots
from fedtune.api.errors import SpecError
from fedtune.api.job import FederatedJob
from fedtune.api.launch import pod_command
from fedtune.api.mailbox import RECEIPT, TICKET, FileMailbox, Waiter
from fedtune.api.methods import ask_peft
from fedtune.api.party import StorageSpec
from fedtune.api.protocol import AggregatorReceipt, TrainerReceipt
from fedtune.api.receipts import (
    MAX_RECEIPT_BYTES,
    MAX_TICKET_BYTES,
    AnyReceipt,
    Rejections,
    TicketRef,
    read_receipt,
    rejected,
    stored_ticket,
)
from fedtune.api.robust import RobustSpec
from fedtune.api.status import FederatedJobStatus
from fedtune.api.support import local_model_dir, verdict
from fedtune.data.checks import check_data
from fedtune.data.own_files import read_own_data
from fedtune.documents import Documents
from fedtune.local import emulator, report
from fedtune.local.children import Pod, Pods
from fedtune.local.progress import Progress
from fedtune.local.run_lock import LOCK_FILE, RunLock, RunnerBusy
from fedtune.local.status_file import (
    LIVE_PHASES,
    STATUS_FILE,
    settle_lost,
    where_stopped,
    write_atomic,
    write_status,
)
from fedtune.local.storage_watch import StorageWatch
from fedtune.rounds import conditions as cond
from fedtune.rounds.intents import (
    COORDINATOR,
    aggregator_intent,
    build_aggregator_ticket,
    build_trainer_ticket,
    trainer_config,
    trainer_intents,
)
from fedtune.rounds.machine import Observation, advance, new_status, resumed
from fedtune.storage import layout
from fedtune.storage.final import export_final, final_names
from fedtune.storage.s3 import Bucket, S3Credentials, StorageError
from fedtune.storage.seaweed import Identity, SeaweedServer
from fedtune.storage.signer import BucketSigner

COORDINATOR_BUCKET = "fedtune-coordinator"
JOB_FILE = "job.json"  # in the work directory, beside STATUS_FILE: what a resume starts from
AGGREGATOR = "aggregator"  # the aggregator pod's name
_STORAGE = "storage"  # the embedded S3 server, among the restart counts
FULL_PASS_SECONDS = 1.0  # the control loop's longest pause between two full passes


def utcnow() -> datetime:
    return datetime.now(UTC)


def _robust_words(robust: RobustSpec | None) -> str:
    """What the start line says of robust aggregation: ', robust <rule> (<settings>)', or nothing."""
    if robust is None:
        return ""
    settings = ", ".join(f"{k} {v}" for k, v in robust.to_wire().items() if k != "rule")
    return f", robust {robust.rule}" + (f" ({settings})" if settings else "")


def _storage_lost(st: FederatedJobStatus) -> bool:
    """Whether the job failed because its storage did not come back."""
    return (
        st.phase == "Failed" and (c := st.condition(cond.STALLED)) is not None and c.reason == cond.STORAGE_UNAVAILABLE
    )


def _dirname(key: str) -> str:
    return key.replace("/", "--")


def _held(box: FileMailbox) -> TicketRef | None:
    """The ticket a mailbox holds; None if it holds none, or something a pod put there."""
    try:
        return stored_ticket(box.raw(TICKET, MAX_TICKET_BYTES))
    except OSError:
        return None


def _held_id(box: FileMailbox) -> str | None:
    held = _held(box)
    return held.id if held else None


class _PeftVerdict(threading.Thread):
    """peft's own check of the job's adapter config, and whether the installed libraries can train it
    on the job's model (fedtune.api.support), in the background: it imports peft and torch."""

    def __init__(self, job: FederatedJob):
        super().__init__(name="peft-config-check", daemon=True)
        self.job, self.error = job, None
        self.start()

    def run(self) -> None:
        spec = self.job.spec
        try:
            ask_peft(spec.peft.method, spec.peft.config, spec.model.task)  # fedtune's own checks ran at parse
            problem, _ = verdict(spec.model, spec.peft, spec.data, model_here=True)
            if problem:
                self.error = SpecError(f"FederatedJob {self.job.metadata.name}: {problem}")
        except ValueError as exc:
            self.error = SpecError(f"FederatedJob {self.job.metadata.name}: spec.peft.config: {exc}")
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread by verdict()
            self.error = exc

    def verdict(self) -> None:
        """Wait for the check; raise what it found."""
        self.join()
        if self.error is not None:
            raise self.error


def _cores() -> int:
    """Cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_slots(parties: int, cores: int, threads: int, ranks: int = 1) -> int:
    """How many training parties may compute at once (fedtune.api.cpu_slots), or 0 for no limit.

    Only when every party is one process (`ranks`: the most ranks of any party): the ranks of a
    multi-rank party run collectives in lockstep, and one of them queueing for a core would stall
    the others.

    With more parties than cores' worth of threads they would time-slice one another; taking turns
    is faster when they fill every turn (6 parties on 2 cores: 3 turns of 2). Otherwise a last,
    half-empty turn would leave cores idle (3 parties on 2 cores: 2 turns against 1.5), so all
    of them run at once.
    """
    slots = max(1, cores // max(1, threads))
    return slots if ranks == 1 and parties > slots and parties % slots == 0 else 0


def _shown(path: Path) -> Path:
    """A path as the user would type it: relative when under the current directory."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the body is done (they are delivered after it)."""
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _bypass_proxy_on_loopback() -> None:
    """The embedded server is on loopback: never send that traffic (or presigned URLs) through a proxy."""
    for var in ("no_proxy", "NO_PROXY"):
        hosts = [h for h in os.environ.get(var, "").split(",") if h]
        os.environ[var] = ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])


class LocalRun:
    """One local run of a job file. `run()` returns the final status."""

    def __init__(
        self, docs: Documents, workdir: Path, out: TextIO = sys.stdout, threads: int | None = None, resume: bool = False
    ):
        own = [docs.parties[k] for k in docs.job.party_keys if docs.parties[k].spec.data.train_path is not None]
        if docs.dataset is None and not own:
            raise SpecError(
                "local mode needs data: each Party's own files (spec.data.trainPath and evalPath, see "
                "examples/own-data.yaml), or a Dataset document dealing a corpus out (examples/quickstart.yaml)"
            )
        if docs.dataset is not None and own:
            raise SpecError(
                f"Parties {', '.join(p.key for p in own)} bring their own files (spec.data.trainPath) and a Dataset "
                "document deals data out too: keep one of the two"
            )
        if docs.job.spec.model.source.startswith("s3://"):
            raise SpecError(
                "spec.model.source: s3:// sources are read from a real S3 bucket; local mode's embedded "
                "S3 starts empty, so use a directory (file:///path) or pkg://<package>/<dir>"
            )
        try:
            local_model_dir(docs.job.spec.model.source)  # here, before any process starts
        except FileNotFoundError as exc:
            raise SpecError(f"{docs.source}: FederatedJob {docs.job.metadata.name}: spec.model.source: {exc}") from None
        kd = docs.job.spec.training.distillation
        if kd is not None:
            try:
                local_model_dir(kd.teacher)
            except FileNotFoundError as exc:
                raise SpecError(
                    f"{docs.source}: FederatedJob {docs.job.metadata.name}: spec.training.distillation.teacher: "
                    f"{exc} (prepare it with `fedtune teacher`)"
                ) from None
        self.docs, self.job, self.out = docs, docs.job, out
        self.workdir = Path(workdir).resolve()  # weed runs with cwd=workdir: relative paths would break
        # The job file as the lock and status.json name it: they are read later, from anywhere.
        self.job_file = str(Path(docs.source).resolve()) if docs.base_dir is not None else docs.source
        self.start_status: FederatedJobStatus | None = self._saved_status() if resume else None
        if not self.job.metadata.uid:
            self.job.metadata.uid = uuid.uuid4().hex[:12]
        self.job.metadata.generation = self.job.metadata.generation or 1
        self.parties = [docs.parties[k] for k in self.job.party_keys]  # the trainers
        self.evaluator = docs.parties[self.job.evaluator_key] if self.job.evaluator_key else None
        self.members = self.parties + ([self.evaluator] if self.evaluator else [])
        self.threads = threads
        self.progress = Progress(out)
        self.baseline: float | None = None
        self.test_baseline: float | None = None
        self.buckets: dict[str, Bucket] = {}
        self.mailboxes: dict[str, FileMailbox] = {}
        self.pods = Pods()
        self.storage: StorageWatch | None = None  # once the embedded S3 server runs
        self.status: FederatedJobStatus | None = None  # the last status the control loop wrote
        self._rejections = Rejections()  # refused receipts, each said once
        self.base_dir = docs.base_dir or Path.cwd()
        self._check_buckets()

    # -- setup ---------------------------------------------------------------------------------

    def _saved_status(self) -> FederatedJobStatus:
        """The status an interrupted run left in the work directory, for the same job; its uid is reused."""
        try:
            saved_job = FederatedJob.model_validate_json((self.workdir / JOB_FILE).read_text())
            st = FederatedJobStatus.model_validate_json((self.workdir / STATUS_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot resume the run in {_shown(self.workdir)}: {exc}") from None
        if saved_job.spec != self.job.spec:
            raise SpecError(
                f"{_shown(self.workdir)} holds a run of a different job spec: resume it with the job file it "
                "started with, or start afresh in another --workdir"
            )
        if st.phase in ("Succeeded", "Failed"):
            raise SpecError(f"the run in {_shown(self.workdir)} already ended ({st.phase}): nothing to resume")
        self.job.metadata.uid = saved_job.metadata.uid  # every object key of the job lives under it
        return st

    def _coordinator_bucket(self) -> str:
        return self.job.spec.storage.bucket if self.job.spec.storage else COORDINATOR_BUCKET

    def _check_buckets(self) -> None:
        owners: dict[str, str] = {}
        for owner, bucket in [(p.key, p.spec.storage.bucket) for p in self.members] + [
            (COORDINATOR, self._coordinator_bucket())
        ]:
            if bucket in owners:
                raise SpecError(
                    f"{owner} and {owners[bucket]} both use bucket {bucket!r}: each party needs its "
                    "own bucket (spec.storage.bucket), separate from the coordinator's"
                )
            owners[bucket] = owner

    def _start_storage(self, stack: ExitStack) -> None:
        owners = {p.key: p.spec.storage.bucket for p in self.members}
        owners[COORDINATOR] = self._coordinator_bucket()
        creds = {o: S3Credentials.generate() for o in owners}
        identities = [Identity(name=_dirname(o), credentials=creds[o], buckets=[b]) for o, b in owners.items()]
        server = SeaweedServer(self.workdir / "s3", identities)
        self.progress.say("starting the embedded S3 server (SeaweedFS) …")
        server.start()
        stack.callback(server.stop)
        self.storage = StorageWatch(server, self.progress.say)
        for owner, bucket in owners.items():
            self.buckets[owner] = Bucket(StorageSpec(endpoint=server.endpoint, bucket=bucket), creds[owner])

        def create(owner: str) -> None:
            self.buckets[owner].ensure(create=True)
            if owner == COORDINATOR:  # the job as it ran, beside what it produces
                self.buckets[owner].put_bytes(layout.job_key(self.job.metadata.uid), self._job_json.encode())

        with ThreadPoolExecutor(max_workers=len(owners)) as pool:  # each first write waits on the server
            list(pool.map(create, owners))
        self.progress.say(
            f"S3 at {server.endpoint}: {len(owners)} buckets, one identity each "
            f"(data under {_shown(self.workdir / 's3')})"
        )

    def _say_data(self, key: str, train: int, ev: int, labels: dict[str, int] | None, origin: str = "") -> None:
        """One party's data line: records per split and the labels of the training split (the evaluator's test set)."""
        if labels is None:
            shown = "prompt/response"
        elif len(labels) <= 6:
            shown = ", ".join(f"{k} {v}" for k, v in labels.items())
        else:
            shown = f"{len(labels)} categories"
        what = f"{ev} held-out test records" if key == self.job.evaluator_key else f"{train} train / {ev} eval records"
        self.progress.say(f"data  {key.split('/')[-1]:<10} {what}{origin} in its own bucket ({shown})")

    def _baselines(self, splits: dict[str, tuple[list[dict], list[dict]]], label_key: str) -> None:
        """Majority-class accuracy on the parties' eval splits, and on the held-out test set."""
        from fedtune.data.partition import majority_baseline

        if self.job.spec.model.task != "sequence-classification":
            return
        test = splits.pop(self.job.evaluator_key, None) if self.job.evaluator_key else None
        if splits:
            self.baseline = majority_baseline(splits, label_key=label_key)
        if test is not None:
            self.test_baseline = majority_baseline({"test": test}, label_key=label_key)

    def _upload_own_data(self, splits) -> None:
        from fedtune.data.own_files import upload_own_data
        from fedtune.data.partition import label_histogram

        upload_own_data(splits, self.buckets)
        schema = self.job.spec.data
        cls = self.job.spec.model.task == "sequence-classification"
        for key, (train, ev) in splits.items():
            shown = train or ev  # the evaluator's labels: its test set's
            labels = label_histogram(shown.records, schema.label_field, schema.labels) if cls else None
            origin = f" from {train.shown} and {ev.shown}" if train else f" from {ev.shown}"
            self._say_data(key, len(train.records) if train else 0, len(ev.records), labels, origin)
        self._baselines({k: (t.records if t else [], e.records) for k, (t, e) in splits.items()}, schema.label_field)

    def _upload_data(self) -> None:
        from fedtune.data.partition import plan_shards
        from fedtune.data.sources import load_source
        from fedtune.data.upload import upload_shards

        ds, schema = self.docs.dataset, self.job.spec.data
        label_key = ds.spec.label_field
        records = load_source(ds.spec.source)
        test_party = self.job.evaluator_key if ds.spec.test_samples else None
        try:
            shards = plan_shards(records, ds, [p.key for p in self.parties], test_party)
        except ValueError as exc:
            raise SpecError(f"Dataset {ds.metadata.name}: {exc}") from None
        dealt = self.parties + ([self.evaluator] if test_party else [])
        self._baselines(dict(shards), label_key)
        summary = upload_shards(
            shards,
            dealt,
            {p.key: self.buckets[p.key] for p in dealt},
            label_key=label_key,
            labels=schema.labels or None,
            test_party=test_party,
        )
        for key, s in summary.items():
            labels = s["eval" if key == test_party else "train"]["labels"]
            self._say_data(key, s["train"]["records"], s["eval"]["records"], labels)

    @cached_property
    def _job_json(self) -> str:
        """The job as it runs (its uid fixed): written to the work directory and the coordinator bucket."""
        return self.job.model_dump_json(by_alias=True, exclude_none=True, indent=1)

    @property
    def _threads_per_party(self) -> int:
        return self.threads or max(1, _cores() // len(self.parties))

    def _pod_env(self) -> dict[str, str]:
        """The environment of every pod: this one without credentials, plus thread and hub settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # pods hold no credentials
        threads = str(self._threads_per_party)
        env.update(
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
        )
        return env

    def _warm_up(self) -> None:
        """Start the process the pods are forked from: it imports the libraries and loads the base model
        while storage and data get ready. No pod is forked before the verdict on the job."""
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        config = logs / "zygote-config.json"  # what decides the model's weights; no URLs, no credentials
        config.write_text(trainer_config(self.job, self.parties[0]).model_dump_json(by_alias=True))
        # One thread in the zygote (a fork copies only the calling thread); each pod sets its own count.
        env = dict(self._pod_env(), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.pods.warm_up(env, logs / "zygote.log", config)

    def _start_pods(self) -> None:
        for stale in (self.workdir / "mailboxes").glob(f"*/{TICKET}"):
            # A resumed run's old tickets carry URLs signed with the last run's credentials: the loop
            # writes them anew. Receipts stay: an answered ticket is not worked again.
            stale.unlink()
        zygote = self.pods.zygote
        if zygote is not None and zygote.alive and not zygote.ready:
            self.progress.say("waiting for the libraries and the base model to load (the pods fork once they have) …")
        base_env = self._pod_env()
        worlds = {p.key: self.job.spec.world_size(p.spec.compute.gpus_per_pod) for p in self.members}
        slots = _cpu_slots(len(self.parties), _cores(), self._threads_per_party, max(worlds.values()))
        slot_dir = str(cpu_slots.make_slots(self.workdir / "cpu-slots", slots)) if slots else None
        pods = [(p.key, "party") for p in self.members] + [(AGGREGATOR, "aggregator")]
        for name, role in pods:
            box = self.workdir / "mailboxes" / _dirname(name)
            self.mailboxes[name] = FileMailbox(box)
            env = dict(base_env, FEDTUNE_NAME=name.split("/")[-1])
            if slot_dir and name in {p.key for p in self.parties}:  # the evaluator's short evals do not queue
                env[cpu_slots.ENV] = slot_dir
            world = worlds.get(name, 1)
            # A party's ranks share its threads, as they share the pod's CPUs on Kubernetes.
            threads = str(1 if role == "aggregator" else max(1, self._threads_per_party // world))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            if world > 1:
                self.progress.say(
                    f"party {name.split('/')[-1]}: {world} ranks under torchrun (compute.gpusPerPod: {world}; "
                    "without a GPU each rank is a CPU process and they talk over gloo)"
                )
            self.pods.start(
                Pod(
                    name=name,
                    command=pod_command(role, str(box), world),
                    env=env,
                    log_path=self.workdir / "logs" / f"{_dirname(name)}.log",
                )
            )
        self.progress.say(
            f"started {len(self.parties)} party trainers ({self._threads_per_party} thread(s) each)"
            f"{', the evaluator' if self.evaluator else ''} and the aggregator; logs in {_shown(self.workdir / 'logs')}"
        )

    # -- control loop ----------------------------------------------------------------------------

    def _receipt(self, name: str, model: type[AnyReceipt]) -> AnyReceipt | None:
        """The receipt in `name`'s mailbox, if it is one this job can take (see fedtune.api.receipts)."""
        box = self.mailboxes[name]
        try:
            raw = box.raw(RECEIPT, MAX_RECEIPT_BYTES)
        except OSError as exc:  # a pod put something else than a file there
            read = rejected(str(exc).encode(), f"{RECEIPT} cannot be read: {exc}")
        else:
            party = name if model is TrainerReceipt else None
            read = read_receipt(raw, model, job=self.job.metadata.uid, party=party, held=_held(box))
        if (note := self._rejections.report(name, read)) is not None:
            self.progress.say("! " + note)
        return read.receipt

    def _receipt_stamp(self) -> tuple:
        """Identity of every receipt file now (receipts are replaced atomically: a new inode each time)."""
        out = []
        for box in self.mailboxes.values():
            try:
                info = os.stat(box.dir / RECEIPT, follow_symlinks=False)
                out.append((info.st_ino, info.st_mtime_ns, info.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def _observe(self) -> Observation:
        storage_error = self.storage.check()  # restarts a SeaweedFS that died, saying so
        receipts = {p.key: r for p in self.members if (r := self._receipt(p.key, TrainerReceipt))}
        aggregator = self._receipt(AGGREGATOR, AggregatorReceipt)
        return Observation(now=utcnow(), receipts=receipts, aggregator=aggregator, storage_error=storage_error)

    def _apply(self, st: FederatedJobStatus, signer: BucketSigner) -> None:
        now = utcnow()
        by_key = {p.key: p for p in self.members}
        for name, intent in trainer_intents(self.job, st).items():
            box = self.mailboxes[name]
            if _held_id(box) != intent.id:
                box.write_ticket(build_trainer_ticket(self.job, intent, by_key[name], st, signer, now).to_wire())
        intent = aggregator_intent(self.job, st)
        box = self.mailboxes[AGGREGATOR]
        if intent is not None and _held_id(box) != intent.id:
            box.write_ticket(build_aggregator_ticket(self.job, intent, st, signer, now).to_wire())

    def _finalize(self, st: FederatedJobStatus) -> None:
        """Copy the last global adapter to final/ in PEFT layout, or (full fine-tuning) transformers layout
        (idempotent; tried again at the next pass when the storage fails meanwhile: the job waits in
        `evaluating` until it is done)."""
        if st.final_adapter is not None or st.stage not in ("evaluating", "done") or st.phase == "Failed":
            return
        uid, coord = self.job.metadata.uid, self.buckets[COORDINATOR]
        prefix = layout.final_prefix(uid)
        try:
            notes = export_final(self.job, coord, st.current_round)
        except StorageError as exc:
            self.progress.say(f"! the final adapter is not copied yet ({exc}); trying again")
            return
        for note in notes:
            self.progress.say("! " + note)
        st.final_adapter = coord.uri(prefix)

    def _loop(self, signer: BucketSigner) -> FederatedJobStatus:
        if self.start_status is None:
            st = new_status(self.job, utcnow())
        else:
            stopped = self.start_status.condition(cond.STALLED) if self.start_status.phase == "Stopped" else None
            st = resumed(self.job, self.start_status, utcnow())
            self.progress.say(
                f"resuming: {st.stage}, round {st.current_round}/{self.job.spec.rounds}"
                + (f" (the last run stopped: {stopped.reason})" if stopped else "")
            )
        # Restarts count across the runs of one job: this run's pods (and S3 server) start at 0.
        before = {p.name: p.pod_restarts for p in st.parties} | {AGGREGATOR: st.aggregator_restarts}
        before[_STORAGE] = st.storage_restarts
        # Sleeps until a pod writes a receipt (inotify), so hand-offs take no polling delay and an
        # idle loop no CPU from the training parties.
        waiter = Waiter([box.dir for box in self.mailboxes.values()], [RECEIPT])
        try:
            return self._run_loop(st, signer, waiter, before)
        finally:
            waiter.close()

    def _count_restarts(self, st: FederatedJobStatus, before: dict[str, int]) -> None:
        """Each pod's restarts by this runner, on top of `before` (those of the runs this one resumes)."""
        for name, pod in self.pods.pods.items():
            n = before.get(name, 0) + pod.restarts
            if name == AGGREGATOR:
                st.aggregator_restarts = n
            else:
                st.party(name).pod_restarts = n
        st.storage_restarts = before.get(_STORAGE, 0) + self.storage.restarts

    def _run_loop(
        self, st: FederatedJobStatus, signer: BucketSigner, waiter: Waiter, before: dict[str, int]
    ) -> FederatedJobStatus:
        written = ""
        stamp, full_at = None, 0.0
        while True:
            # A full pass (parse receipts, advance, sign, check pods) only when a receipt changed, or
            # every FULL_PASS_SECONDS for deadlines and dead pods.
            now_stamp = self._receipt_stamp()
            if now_stamp == stamp and time.monotonic() - full_at < FULL_PASS_SECONDS:
                waiter.wait(FULL_PASS_SECONDS - (time.monotonic() - full_at))
                continue
            stamp, full_at = now_stamp, time.monotonic()
            obs = self._observe()
            st, events = advance(self.job, st, obs)
            if obs.storage_error is None or st.phase in ("Succeeded", "Failed"):
                # While the storage is down the round waits (its tickets stand); exit tickets go out regardless.
                self._finalize(st)
                self._apply(st, signer)
            self._count_restarts(st, before)
            self.progress.update(st, events)
            doc = st.model_dump_json(by_alias=True, exclude_none=True, indent=1)
            if doc != written:  # the file changes a few times a round
                write_atomic(self.workdir / STATUS_FILE, doc)  # a kill mid-write must not lose what a resume needs
                written = doc
                stamp = None  # the state moved: pass again at once until it settles
            self.status = st
            if st.phase in ("Succeeded", "Failed"):
                return st
            for note in self.pods.check():
                self.progress.say("! " + note)
            if all(p.gave_up for p in self.pods.pods.values()):
                raise RuntimeError(f"every pod keeps crashing; see the logs in {_shown(self.workdir / 'logs')}")

    # -- results -----------------------------------------------------------------------------------

    def _collect(self, st: FederatedJobStatus) -> Path:
        final = self.workdir / "final"
        final.mkdir(parents=True, exist_ok=True)
        uid, coord = self.job.metadata.uid, self.buckets[COORDINATOR]
        prefix = layout.final_prefix(uid)
        extra = {"majorityBaseline": self.baseline, "testMajorityBaseline": self.test_baseline}
        extra["workdir"] = str(self.workdir)
        doc = report.metrics_document(self.job, st, extra)
        report.write_metrics(final / layout.FINAL_METRICS, doc)
        title = f"{self.job.metadata.name}: {self.job.spec.peft.method} + {self.job.spec.strategy.name}"
        has_plot = report.plot(st, final / layout.FINAL_PLOT, title, self.baseline, self.test_baseline)
        if st.phase == "Succeeded":
            for name in final_names(self.job, coord):
                (final / name).write_bytes(coord.get_bytes(prefix + name))
        if _storage_lost(st):  # the run ends because the storage did not come back: what is here is kept
            self.progress.say(f"! metrics are in {_shown(final)} only: the storage is unavailable")
            return final
        try:  # a copy beside the adapter, for whoever reads the bucket; the local files are what counts
            coord.put_bytes(prefix + layout.FINAL_METRICS, (final / layout.FINAL_METRICS).read_bytes())
            if has_plot:
                coord.put_bytes(prefix + layout.FINAL_PLOT, (final / layout.FINAL_PLOT).read_bytes())
        except StorageError as exc:
            self.progress.say(f"! metrics are in {_shown(final)} only: {exc}")
        return final

    def run(self) -> FederatedJobStatus:
        """Run the job to the end; Ctrl-C stops every child and the S3 server, keeping what was written.

        Whatever ends the run early (Ctrl-C, SIGTERM raised as KeyboardInterrupt, an error), status.json
        says so: phase Stopped, once every child has stopped.
        """
        # Bad data: an error before anything starts or is written (the same checks as `fedtune validate`).
        check_data(self.docs)
        own = read_own_data(self.job, self.parties, self.base_dir, self.evaluator)
        emulator.ensure(self.job.spec, self.progress.say)  # offsite tuning: what the parties load
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpecError(f"work directory {_shown(self.workdir)}: cannot create it ({exc.strerror})") from None
        lock = None
        try:
            with _signals_held():  # a Ctrl-C now lands once status.json can say where the run stopped
                lock = self._take_lock()
                self._begin(lock)
            return self._run(own)
        except BaseException as exc:
            self._mark_stopped(exc)
            raise
        finally:
            if lock is not None:
                lock.release()

    def _unwritable(self, exc: OSError) -> SpecError:
        what = f"{Path(exc.filename).name}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        return SpecError(
            f"work directory {_shown(self.workdir)}: cannot write in it ({what}): make it writable, or start "
            "afresh in another --workdir"
        )

    def _take_lock(self) -> RunLock:
        """This runner's hold on the work directory (one runner per directory), recording the job file."""
        try:
            return RunLock.acquire(self.workdir, {"jobFile": self.job_file, "started": utcnow().isoformat()})
        except RunnerBusy as exc:
            if not exc.live:
                raise SpecError(
                    f"{_shown(self.workdir / LOCK_FILE)} is held by a process that is {exc} (a `fedtune status` "
                    "that did not let go?): run this again in a moment"
                ) from None
            raise SpecError(
                f"another fedtune run ({exc}) is running in {_shown(self.workdir)}: two would drive one job "
                "twice; wait for it, or stop it (Ctrl-C in its terminal) and run this again to resume"
            ) from None
        except OSError as exc:
            raise self._unwritable(exc) from None

    def _begin(self, lock: RunLock) -> None:
        """With the lock held, before anything slow starts (S3, data, the base model): settle a status a lost
        runner left, then write job.json and a Pending status, so a run stopped from here on leaves a work
        directory that says so and resumes."""
        try:
            self._settle_lost(lock)
            write_atomic(self.workdir / JOB_FILE, self._job_json)
            now = utcnow()
            st = new_status(self.job, now) if self.start_status is None else self.start_status.model_copy(deep=True)
            cond.mark_starting(st, "starting: the embedded S3 server, the data, the base model", now)
            write_status(self.workdir, st)
        except OSError as exc:
            raise self._unwritable(exc) from None
        self.status = st

    def _settle_lost(self, lock: RunLock) -> None:
        """A status left Running by a runner that is gone (killed outright) is marked so before resuming."""
        if self.start_status is None or self.start_status.phase not in LIVE_PHASES:
            return
        phase = self.start_status.phase
        self.start_status = settle_lost(self.workdir, lock.previous) or self.start_status
        who = f"pid {lock.previous['pid']}" if "pid" in lock.previous else "its process"
        self.progress.say(
            f"! the last run's runner ({who}) ended without finishing and left status.json saying "
            f"{phase}: marked Stopped (RunnerLost)"
        )

    def _mark_stopped(self, exc: BaseException) -> None:
        """The run ends before the job: say why in status.json, so nothing claims Running when nothing runs."""
        st = self.status
        if st is None or st.phase not in LIVE_PHASES:
            return  # no status written yet, or the job ended on its own
        if isinstance(exc, KeyboardInterrupt):
            reason, why = cond.INTERRUPTED, f"stopped by {exc.args[0] if exc.args else 'SIGINT (Ctrl-C)'}"
        else:
            reason, why = cond.RUNNER_CRASHED, f"the runner stopped on an error ({type(exc).__name__}: {exc})"
        # Read later, from anywhere: the paths are absolute.
        message = (
            f"{why} {where_stopped(st, self.job.spec.rounds)}; every child process was stopped. "
            f"Resume with: fedtune run {self.job_file} --workdir {self.workdir}"
        )
        cond.mark_halted(st, "Stopped", reason, message, utcnow())
        with _signals_held():  # a second Ctrl-C must not leave the file saying Running
            write_status(self.workdir, st)

    def _run(self, own: dict) -> FederatedJobStatus:
        spec = self.job.spec
        self.progress.say(
            f"job {self.job.metadata.name} (uid {self.job.metadata.uid}): {len(self.parties)} parties"
            f"{f' and evaluator {self.evaluator.metadata.name}' if self.evaluator else ''}, "
            f"{spec.rounds} rounds, {spec.peft.method} on {spec.model.source}, strategy "
            f"{spec.strategy.name}, aggregation {spec.aggregator.lora_mode}{_robust_words(spec.aggregator.robust)}; "
            f"workdir {_shown(self.workdir)}"
        )
        peft_verdict = _PeftVerdict(self.job)  # runs while the data is uploaded and the S3 server starts
        _bypass_proxy_on_loopback()  # before the pods start: they inherit the environment
        with ExitStack() as stack:
            # The libraries load into the zygote while S3 starts, the verdict is asked and the data uploaded.
            self._warm_up()
            stack.callback(self.pods.stop)
            self._start_storage(stack)
            if own:
                self._upload_own_data(own)
            if self.docs.dataset is not None:
                self._upload_data()
            peft_verdict.verdict()  # a job the libraries cannot train starts no pod
            stack.callback(self.pods.stop)  # pods stop before their S3 server does
            self._start_pods()
            st = self._loop(BucketSigner(self.buckets))
            self.pods.finishing = True
            final = self._collect(st)  # while the pods exit
            grace = 5 if _storage_lost(st) else 60  # pods stuck in a transfer to a dead store never read theirs
            if not self.pods.wait(timeout=grace):
                self.progress.say(f"! some pods did not exit in {grace} s; stopping them")
        self._print_summary(st, final)
        return st

    def _print_summary(self, st: FederatedJobStatus, final: Path) -> None:
        print("\n" + report.round_table(st), file=self.out)
        if self.baseline is not None:
            print(f"\nmajority-class baseline on the parties' eval splits: {self.baseline:.3f}", file=self.out)
        if self.test_baseline is not None:
            print(f"majority-class baseline on the held-out test set: {self.test_baseline:.3f}", file=self.out)
        if (table := report.personal_table(st)) is not None:
            print("\n" + table, file=self.out)
        if (c := st.condition(cond.PRIVACY_BUDGET_EXHAUSTED)) is not None:
            print(f"\nprivacy budget exhausted: {c.message}", file=self.out)
        if st.phase == "Succeeded":
            what, load = report.final_hint(self.job.spec.peft.method, str(_shown(final)))
            print(
                f"\nSucceeded. Final {what} in {_shown(final)}; metrics.json and metrics.png beside it.\n"
                f"Load it with: {load}",
                file=self.out,
            )
            if self.job.spec.personalization is not None:
                print(
                    "It holds the shared part only: each party's personal part is in its own bucket "
                    "(fedtune/<job>/personal.safetensors); merge the two to load a party's model (README, "
                    '"Personalised adapters").',
                    file=self.out,
                )
        else:
            print(f"\nFailed: {st.message}\nPartial results and logs in {_shown(self.workdir)}", file=self.out)
        self.out.flush()
