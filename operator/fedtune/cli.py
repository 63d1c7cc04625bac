"""The `fedtune` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from fedtune import __version__
from fedtune.api.errors import SpecError
from fedtune.storage.s3 import StorageError
from fedtune.storage.seaweed import SeaweedError


def _cmd_validate(args: argparse.Namespace) -> int:
    from fedtune.api.support import verdict
    from fedtune.data.checks import data_problems
    from fedtune.documents import load_documents

    docs = load_documents(args.file, require_parties=False)
    job = docs.job
    problems = data_problems(docs)
    # A file that brings its data to this machine runs here: its model must be here too.
    problem, note = verdict(job.spec.model, job.spec.peft, job.spec.data, model_here=docs.runs_here)
    if problem:
        problems.append(f"{args.file}: FederatedJob {job.metadata.name}: {problem}")
    if problems:
        raise SpecError("\n".join(problems))
    n = len(docs.parties)
    print(
        f"{args.file}: FederatedJob {job.metadata.name} with {n} Part{'y' if n == 1 else 'ies'}"
        f"{', a Dataset' if docs.dataset else ''}: valid"
    )
    missing = [k for k in job.member_keys if k not in docs.parties]
    if missing:
        print(f"  (Parties {', '.join(missing)} are not in the file: fine on Kubernetes, needed by `fedtune run`)")
    if note:
        print(f"  ({note})")
    return 0


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM stops a run as Ctrl-C does: every child stopped, the status saying so."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _cmd_run(args: argparse.Namespace) -> int:
    from fedtune.api.methods import peft_itself_deferred
    from fedtune.documents import load_documents
    from fedtune.local.runner import STATUS_FILE, LocalRun

    with peft_itself_deferred():  # LocalRun asks peft in the background, before the first ticket
        docs = load_documents(args.file)
    workdir = (
        Path(args.workdir)
        if args.workdir
        else Path("runs") / f"{docs.job.metadata.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if workdir.exists() and not workdir.is_dir():
        raise SpecError(f"--workdir {workdir} is a file: name a directory (new, or one to resume)")
    resume = (workdir / STATUS_FILE).is_file()
    try:
        used = workdir.exists() and any(workdir.iterdir())
    except OSError as exc:
        raise SpecError(
            f"work directory {workdir}: cannot read it ({exc.strerror}): pick another with --workdir"
        ) from None
    if used and not resume:
        raise SpecError(f"work directory {workdir} is not empty: pick another with --workdir (nothing was overwritten)")
    run = LocalRun(docs, workdir, threads=args.threads, resume=resume)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        st = run.run()
    except KeyboardInterrupt as exc:
        if (workdir / STATUS_FILE).is_file():
            print(
                f"\ninterrupted: every child process was stopped; partial results and logs in {workdir}\n"
                f"resume with: fedtune run {args.file} --workdir {workdir}",
                file=sys.stderr,
            )
        else:  # stopped before the run took its work directory: nothing to resume
            print("\ninterrupted before the run started: nothing to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if exc.args == ("SIGTERM",) else signal.SIGINT)
    return 0 if st.phase == "Succeeded" else 1


def _cmd_status(args: argparse.Namespace) -> int:
    """Say where a local run stands; a status left Running by a runner that is gone is marked so first."""
    from fedtune.local.run_lock import LOCK_FILE, RunLock, RunnerBusy
    from fedtune.local.status_file import read_status, settle_lost
    from fedtune.rounds.conditions import STALLED

    workdir = Path(args.workdir)
    try:
        st = read_status(workdir)
    except OSError as exc:
        raise SpecError(
            f"{workdir}: cannot read status.json ({exc.strerror}): name a fedtune run's work directory"
        ) from None
    except ValueError:
        raise SpecError(f"{workdir}/status.json is not a fedtune job status (edited by hand?)") from None
    live = ""
    try:
        lock = RunLock.acquire(workdir)  # without writing in it: the lock keeps naming the last runner
    except RunnerBusy as exc:
        if exc.live:
            live = f", its runner ({exc}) is alive"
        else:
            live = f", cannot tell whether its runner is alive ({LOCK_FILE} is held by a process that is {exc})"
    except OSError as exc:  # a work directory this user may read but not write: report what the file says
        live = f", cannot tell whether its runner is alive (cannot open {workdir / LOCK_FILE}: {exc.strerror})"
    else:
        with lock:
            try:
                st = settle_lost(workdir, lock.previous) or st
            except OSError as exc:
                live = f", its runner is gone (status.json not updated: {exc.strerror})"
    stalled = st.condition(STALLED)
    why = f" ({stalled.reason})" if stalled is not None and stalled.status == "True" else ""
    print(f"{workdir}: {st.phase}{why}, {st.stage}, round {st.current_round}, parties {st.parties_ready}{live}")
    if st.message:
        print(f"  {st.message}")
    if any(p.pod_restarts for p in st.parties) or st.aggregator_restarts:
        restarts = ", ".join(f"{p.name} {p.pod_restarts}" for p in st.parties if p.pod_restarts)
        print(f"  restarts: {restarts or 'no party'}; aggregator {st.aggregator_restarts}")
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    """Partition a Dataset across the file's Parties and upload the shards with each party's credentials."""
    from fedtune.data.checks import check_data
    from fedtune.data.partition import plan_shards
    from fedtune.data.sources import load_source
    from fedtune.data.upload import upload_shards
    from fedtune.documents import load_documents
    from fedtune.storage.s3 import Bucket, S3Credentials

    docs = load_documents(args.file)
    if docs.dataset is None:
        raise SpecError(f"{args.file} has no Dataset document: add one saying the source and how to split it")
    check_data(docs)
    try:
        creds_doc = json.loads(Path(args.credentials).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"--credentials {args.credentials}: {exc}") from None
    test_party = docs.job.evaluator_key if docs.dataset.spec.test_samples else None
    parties = [docs.parties[k] for k in docs.job.party_keys + ([test_party] if test_party else [])]
    buckets = {}
    for p in parties:
        c = (creds_doc.get(p.key) or creds_doc.get(p.metadata.name)) if isinstance(creds_doc, dict) else None
        if not isinstance(c, dict) or not {"accessKeyId", "secretAccessKey"} <= set(c):
            raise SpecError(
                f"--credentials has no entry for party {p.key} (keys: namespace/name or name, "
                "values: {accessKeyId, secretAccessKey})"
            )
        storage = p.spec.storage.model_copy(update={"endpoint": args.endpoint or p.spec.storage.endpoint})
        buckets[p.key] = Bucket(storage, S3Credentials(c["accessKeyId"], c["secretAccessKey"]))
    try:
        shards = plan_shards(load_source(docs.dataset.spec.source), docs.dataset, docs.job.party_keys, test_party)
    except ValueError as exc:
        raise SpecError(f"Dataset {docs.dataset.metadata.name}: {exc}") from None
    summary = upload_shards(
        shards,
        parties,
        buckets,
        labels=docs.job.spec.data.labels or None,
        create_buckets=args.create_buckets,
        test_party=test_party,
    )
    for key, s in summary.items():
        if key == test_party:
            print(f"{key}: {s['eval']['records']} held-out test records -> s3://{s['bucket']}/{s['eval']['key']}")
            continue
        print(
            f"{key}: {s['train']['records']} train / {s['eval']['records']} eval records -> "
            f"s3://{s['bucket']}/{s['train']['key']}  labels {s['train']['labels']}"
        )
    return 0


def _cmd_teacher(args: argparse.Namespace) -> int:
    """Fine-tune the job's base model on a public share of the data: the distillation teacher.

    The trainer package does the work, in a child process (`python -m fedtune_trainer teacher`):
    the control plane itself never imports torch.
    """
    import subprocess
    import tempfile

    from fedtune.api.protocol import TrainerConfig
    from fedtune.api.support import local_model_dir
    from fedtune.documents import load_documents

    docs = load_documents(args.file, require_parties=False)
    spec = docs.job.spec
    kd = spec.training.distillation
    output = args.output
    if output is None:
        if kd is None or kd.teacher.startswith(("hf://", "s3://", "pkg://")):
            raise SpecError(
                "--output is needed: the job names no file:// training.distillation.teacher to write the teacher to"
            )
        output = kd.teacher.removeprefix("file://")
    model = spec.model if args.base is None else spec.model.model_copy(update={"source": args.base})
    try:
        local_model_dir(model.source)
    except FileNotFoundError as exc:
        raise SpecError(f"{'--base' if args.base else 'spec.model.source'}: {exc}") from None
    for name in filter(None, (args.data, args.eval)):
        if not Path(name).is_file():
            raise SpecError(f"{name}: no such file (give the public share as JSON lines)")
    config = TrainerConfig(
        model=model, peft=spec.peft, data=spec.data, training=spec.training, deepspeed=spec.deepspeed
    )
    with tempfile.TemporaryDirectory(prefix="fedtune-teacher-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config.to_wire()))
        argv = [sys.executable, "-m", "fedtune_trainer", "teacher", "--config", str(path), "--data", args.data]
        argv += ["--output", output, "--epochs", str(args.epochs), "--learning-rate", str(args.learning_rate)]
        argv += ["--eval", args.eval] if args.eval else []
        return subprocess.run(argv, check=False).returncode


def _cmd_emulator(args: argparse.Namespace) -> int:
    """Derive the offsite-tuning emulator from the job's full model (the model owner's step, once per job)."""
    from fedtune.documents import load_documents
    from fedtune.local.emulator import build

    spec = load_documents(args.file, require_parties=False).job.spec
    output = args.output
    if output is None:
        if spec.model.emulator is None or spec.model.emulator.startswith(("hf://", "s3://", "pkg://")):
            raise SpecError(
                f"--output is needed: spec.model.emulator ({spec.model.emulator}) is not a local directory to "
                "write the emulator to (write it here, then publish it there)"
            )
        output = spec.model.emulator.removeprefix("file://")
    if Path(output).exists():
        raise SpecError(f"{output} exists: remove it to build the emulator again (nothing was overwritten)")
    print(build(spec, output))
    return 0


def _cmd_crds(args: argparse.Namespace) -> int:
    """Write the CRDs generated from the API models, or with --check compare them with the files there."""
    import difflib

    from fedtune.k8s.crd import rendered_crds

    out = Path(args.output_dir)
    files = rendered_crds()
    if not args.check:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
            print(f"wrote {out / name}")
        return 0
    stale = []
    for name, text in files.items():
        path = out / name
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old != text:
            stale.append(name)
            diff = list(difflib.unified_diff(old.splitlines(True), text.splitlines(True), f"{path}", "generated"))
            sys.stdout.writelines(diff[:60])  # enough to see what changed; the fix is to regenerate anyway
            if len(diff) > 60:
                print(f"... {len(diff) - 60} more diff lines")
    if stale:
        print(
            f"error: {', '.join(stale)} differ(s) from the API models: run `fedtune crds --output-dir {out}`",
            file=sys.stderr,
        )
        return 1
    print(f"{out}: {len(files)} CRDs match the API models")
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    """Run the Kubernetes operator (kopf) in the foreground."""
    import logging

    import kopf

    from fedtune.k8s.settings import OperatorSettings

    settings = OperatorSettings.from_env()  # fail fast on a bad FEDTUNE_* variable
    fmt = kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=fmt)
    logging.getLogger("fedtune").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    import fedtune.k8s.operator  # noqa: F401  (registers the handlers)

    if settings.leader_election:  # one of several replicas: kopf starts only in the Lease's holder
        from fedtune.k8s.leader import Election

        candidate = Election(settings)
        candidate.start()
        candidate.wait_until_leading(args.liveness or None)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness or None,
        standalone=True,
    )
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models.")
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job file locally (embedded S3, pods as processes)")
    run.add_argument("file", help="YAML with a FederatedJob, its Parties and a Dataset")
    run.add_argument(
        "--workdir",
        help="where S3 data, logs, mailboxes and results go (default runs/<job>-<time>); "
        "the work directory of an interrupted run resumes it from its last completed round",
    )
    run.add_argument("--threads", type=_positive, help="torch threads per party (default: cores / parties)")
    run.set_defaults(func=_cmd_run)
    status = sub.add_parser(
        "status", help="where a local run stands (a run whose runner was killed is marked Stopped first)"
    )
    status.add_argument("workdir", help="the run's work directory")
    status.set_defaults(func=_cmd_status)
    val = sub.add_parser("validate", help="check a job file and explain what is wrong")
    val.add_argument("file")
    val.set_defaults(func=_cmd_validate)
    op = sub.add_parser("operator", help="run the Kubernetes operator (settings from FEDTUNE_* variables)")
    op.add_argument("--namespace", action="append", help="watch only this namespace (repeatable; default: all)")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint ('' = off)")
    op.add_argument("--verbose", action="store_true", help="debug logs")
    op.set_defaults(func=_cmd_operator)
    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    part = data.add_parser("partition", help="split a Dataset across parties and upload each shard to its bucket")
    part.add_argument("file", help="YAML with a FederatedJob, its Parties and a Dataset")
    part.add_argument(
        "--credentials",
        required=True,
        help="JSON file: {party: {accessKeyId, secretAccessKey}}; each shard is written with its party's own",
    )
    part.add_argument("--endpoint", help="S3 endpoint overriding the Parties' spec.storage.endpoint")
    part.add_argument("--create-buckets", action="store_true", help="create missing buckets")
    part.set_defaults(func=_cmd_partition)
    teacher = sub.add_parser(
        "teacher",
        help="fine-tune the job's base model (every weight) on a public data share: the distillation teacher",
    )
    teacher.add_argument("file", help="YAML with the FederatedJob (its model, data schema and training settings)")
    teacher.add_argument("--data", required=True, help="the public share: JSON lines in the job's data schema")
    teacher.add_argument(
        "--output", help="where the checkpoint goes (default: the job's file:// training.distillation.teacher)"
    )
    teacher.add_argument("--epochs", type=_positive, default=3, help="passes over the public data (default 3)")
    teacher.add_argument("--learning-rate", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    teacher.add_argument("--base", help="model source to fine-tune instead of spec.model.source (e.g. a larger model)")
    teacher.add_argument("--eval", help="held-out JSON lines to report the teacher's accuracy on")
    teacher.set_defaults(func=_cmd_teacher)

    emulator = sub.add_parser(
        "emulator",
        help="derive the offsite-tuning emulator from the job's full model (peft.method offsite): parties train on it",
    )
    emulator.add_argument("file", help="YAML with the FederatedJob (its model, peft.config and data schema)")
    emulator.add_argument("--output", help="where the emulator goes (default: the job's local spec.model.emulator)")
    emulator.set_defaults(func=_cmd_emulator)
    crds = sub.add_parser("crds", help="write the CRD YAML generated from the API models (one file per kind)")
    crds.add_argument("--output-dir", default="crds", help="where to write (default crds/)")
    crds.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files there are stale")
    crds.set_defaults(func=_cmd_crds)
    return parser


# bitsandbytes, imported by peft wherever it is installed, warns at import on CPUs with AVX512-BF16 that an
# optional accelerated kernel (the `kernels` package) is missing: nothing a fedtune user can act on, and it
# would turn every one-line error of the CLI into two. Its real errors still show.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def main(argv: list[str] | None = None) -> int:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, StorageError, SeaweedError) as exc:  # the user can act on these: say what, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a run (which says more itself)
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
