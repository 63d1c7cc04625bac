"""Operator scale: time from FederatedJob creation to all its pods, and operator memory, for 1/10/50 jobs.

    python bench/operator_scale.py [--smoke] [--out bench/results] [--jobs 1,10,50] [--parties 4]

The real operator (`fedtune.k8s.operator`, kopf) runs against the Kubernetes API emulator of the
test suite (tests/kube.py, kmock) with a real SeaweedFS for the Parties' and the coordinator's
buckets. No pod runs: the benchmark only watches pod creations.

Processes, so that each number belongs to one thing:
- this script: SeaweedFS (its own process), and per scale a fresh emulator and a fresh worker;
- the emulator (`--emulator`): the API server, in its own process, so its object store is not
  counted as operator memory;
- the worker (`--worker`): the operator in a thread, plus a pod watch and a small REST client.
  Memory is this worker's resident set (VmRSS from /proc, not tracemalloc): "idle" once every
  Party is Ready, "after" once every job's pods exist, "settled" a resync period later.

Per job: N x (parties + 1) pods (one trainer per party, one aggregator). All jobs of a scale are
created in one burst; a job's latency runs from its create call returning to the ADDED watch event
of its last pod. Every Party takes part in every job (an organisation in many federations).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlbench

sys.path.insert(0, str(mlbench.ROOT / "tests"))  # KubeEmulator lives with the test harness
HUB = "hub"
MANAGED = "app.kubernetes.io/managed-by=fedtune-operator"


def rss_mib() -> dict[str, float]:
    """Resident set now and its peak (VmRSS, VmHWM) of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


# --- the emulator process ---------------------------------------------------------------------------


def emulator_main() -> None:
    """Serve an emulated API server until stdin closes; its URL is the first line printed."""
    from kube import KubeEmulator

    with KubeEmulator() as kube:
        print(kube.url, flush=True)
        sys.stdin.read()


# --- the worker process: world objects, the operator, the burst --------------------------------------


def _secret(ns: str, name: str, creds: dict) -> dict:
    enc = lambda v: base64.b64encode(v.encode()).decode()  # noqa: E731
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "data": {"accessKeyId": enc(creds["access_key_id"]), "secretAccessKey": enc(creds["secret_access_key"])},
    }


def _job(name: str, endpoint: str, parties: list[str]) -> dict:
    return {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name, "namespace": HUB},
        "spec": {
            "model": {"source": mlbench.MINILM, "task": "sequence-classification"},
            "peft": {"method": "lora", "config": dict(mlbench.LORA)},
            "data": {"labels": mlbench.SENTIMENT, "maxLength": 64},
            "storage": {"endpoint": endpoint, "bucket": "hub-bkt", "credentialsSecret": {"name": "hub-s3"}},
            "rounds": 3,
            "minParties": len(parties),
            "roundTimeoutSeconds": 3600,
            "parties": [{"name": p, "namespace": f"org-{p}"} for p in parties],
        },
    }


class PodWatch:
    """Records the arrival time of every pod the operator creates (one watch on the emulator)."""

    def __init__(self, kube):
        self.kube, self.added = kube, {}  # (namespace, name) -> (seconds, job label)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import urllib3

        http = urllib3.PoolManager()
        while not self._stop.is_set():
            resp = http.request(
                "GET",
                f"{self.kube.url}/api/v1/pods",
                fields={"watch": "true", "labelSelector": MANAGED, "timeoutSeconds": "30"},
                headers={"Authorization": f"Bearer {self.kube.token}"},
                preload_content=False,
                timeout=urllib3.Timeout(connect=5, read=60),
            )
            buf = b""
            for chunk in resp.stream(4096, decode_content=True):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                now = time.perf_counter()
                for line in filter(None, lines):
                    ev = json.loads(line)
                    meta = ev.get("object", {}).get("metadata", {})
                    key = (meta.get("namespace"), meta.get("name"))
                    if ev.get("type") == "ADDED" and key not in self.added:
                        self.added[key] = (now, meta.get("labels", {}).get("fedtune.io/job"))
            resp.release_conn()

    def stop(self) -> None:
        self._stop.set()


class ClientBuilds:
    """Counts `fedtune.storage.s3.Bucket` constructions (one per party per reconcile) and their time."""

    def __init__(self) -> None:
        from fedtune.storage import s3

        self.count, self.seconds, self._lock = 0, 0.0, threading.Lock()
        original = s3.Bucket.__init__

        def counted(bucket, *args, **kwargs):
            start = time.perf_counter()
            original(bucket, *args, **kwargs)
            with self._lock:
                self.count += 1
                self.seconds += time.perf_counter() - start

        s3.Bucket.__init__ = counted

    def reset(self) -> None:
        with self._lock:
            self.count, self.seconds = 0, 0.0


def worker_main(
    url: str, world_path: str, jobs: int, settle: float, with_peft: bool, pods_timeout: float, emulator_pid: int
) -> None:
    """Build the world, start the operator, create `jobs` jobs at once, print one RESULT line."""
    os.environ["FEDTUNE_METRICS_PORT"] = "0"  # several operators in a row: no fixed port
    if not with_peft:
        # The operator image has no peft/torch; here they are installed, and the spec check would
        # import them (~300 MiB, seconds). Hide peft so the operator runs as it does in its image.
        sys.modules["peft"] = None  # type: ignore[assignment]
    from kube import KubeEmulator

    builds = ClientBuilds()
    world = json.loads(Path(world_path).read_text())
    parties, endpoint = world["parties"], world["endpoint"]
    kube = KubeEmulator()  # used as a REST client only: the server runs in the emulator process
    kube.url = url
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "cpu-1"},
            "status": {"allocatable": {"cpu": "1000", "memory": "4000Gi", "pods": "10000"}},
        }
    )
    kube.create(_secret(HUB, "hub-s3", world["creds"][HUB]))
    for p in parties:
        ns = f"org-{p}"
        kube.create(_secret(ns, "s3", world["creds"][p]))
        kube.create(
            {
                "apiVersion": "fedtune.io/v1alpha1",
                "kind": "Party",
                "metadata": {"name": p, "namespace": ns},
                "spec": {
                    "storage": {"endpoint": endpoint, "bucket": f"{p}-bkt", "credentialsSecret": {"name": "s3"}},
                    "data": {"trainKey": "train.jsonl", "evalKey": "eval.jsonl"},
                    "compute": {"cpu": "1", "memory": "1Gi"},
                    "consent": {"allowedNamespaces": [HUB]},
                },
            }
        )
    with kube.run_kopf("fedtune.k8s.operator"):
        kube.wait_for(
            lambda: all(
                ((kube.get("parties", f"org-{p}", p) or {}).get("status") or {}).get("phase") == "Ready"
                for p in parties
            ),
            timeout=60,
            what="every Party Ready",
        )
        watch = PodWatch(kube)
        per_job = len(parties) + 1
        time.sleep(1.0)  # the watch is established, the operator idle
        # A first job pays one-time costs (first S3 client, first children of each kind): measured apart.
        cold_rss = rss_mib()
        start = time.perf_counter()
        kube.create(_job("warm-up", endpoint, parties))
        kube.wait_for(lambda: len(watch.added) >= per_job, timeout=300, what="the warm-up job's pods")
        cold = max(t for t, _ in watch.added.values()) - start
        time.sleep(settle)
        idle = rss_mib()
        created = {}
        builds.reset()
        burst_start = time.perf_counter()
        cpu_start, emu_cpu_start = time.process_time(), proc_cpu_seconds(emulator_pid)
        for i in range(jobs):
            name = f"fj-{i:03d}"
            kube.create(_job(name, endpoint, parties))
            created[name] = time.perf_counter()
        expected = (jobs + 1) * per_job
        deadline = burst_start + pods_timeout
        while len(watch.added) < expected and time.perf_counter() < deadline:
            time.sleep(0.1)
        burst_seconds = time.perf_counter() - burst_start
        worker_cpu = time.process_time() - cpu_start
        emulator_cpu = proc_cpu_seconds(emulator_pid) - emu_cpu_start
        client_builds, client_seconds = builds.count, builds.seconds
        from fedtune.storage import s3

        boto_clients = len(s3._clients._clients)
        after = rss_mib()
        time.sleep(settle)
        settled = rss_mib()
        per: dict[str, list[float]] = {}
        for seconds, job in watch.added.values():
            per.setdefault(job, []).append(seconds)
        complete = {j: max(per[j]) for j in created if len(per.get(j, [])) >= per_job}
        result = {
            "jobs": jobs,
            "pods": sum(len(per.get(j, [])) for j in created),
            "expected_pods": jobs * per_job,
            "complete_jobs": len(complete),
            "timed_out": len(complete) < jobs,
            "pods_timeout": pods_timeout,
            "cold_first_job_seconds": cold,
            "burst_create_seconds": max(created.values()) - burst_start,
            "all_pods_seconds": max(complete.values()) - burst_start if len(complete) == jobs else None,
            "latency": sorted(complete[j] - created[j] for j in complete),
            "s3_clients_built": client_builds,
            "s3_client_build_seconds": client_seconds,
            "boto3_clients": boto_clients,
            "worker_cpu_seconds": worker_cpu,
            "emulator_cpu_seconds": emulator_cpu,
            "burst_seconds": burst_seconds,
            "rss_before_first_job": cold_rss["VmRSS"],
            "rss_idle": idle["VmRSS"],
            "rss_after": after["VmRSS"],
            "rss_settled": settled["VmRSS"],
            "rss_peak": settled["VmHWM"],
            "torch_imported": "torch" in sys.modules,
        }
        print("RESULT " + json.dumps(result), flush=True)
        watch.stop()
    # The operator stopped cleanly; nothing else to release (the emulator process is the parent's).


# --- the driver ------------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def one_scale(jobs: int, world_path: Path, settle: float, pods_timeout: float, with_peft: bool) -> dict:
    emu = subprocess.Popen(
        [sys.executable, __file__, "--emulator"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        url = emu.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"the emulator did not start (said {url!r})")
        worker = subprocess.run(
            [sys.executable, __file__, "--worker", url, "--world", str(world_path), "--n", str(jobs)]
            + ["--settle", str(settle), "--pods-timeout", str(pods_timeout), "--emulator-pid", str(emu.pid)]
            + (["--with-peft"] if with_peft else []),
            capture_output=True,
            text=True,
            timeout=pods_timeout + 300,
        )
        lines = [ln for ln in worker.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"worker for {jobs} job(s) failed (rc {worker.returncode}):\n{worker.stderr[-4000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        result["emulator_rss"] = proc_rss_mib(emu.pid)
        return result
    finally:
        emu.stdin.close()
        try:
            emu.wait(timeout=20)
        except subprocess.TimeoutExpired:
            emu.kill()
            emu.wait()


def report(args, results: list[dict], info: dict, total: float) -> str:
    rows = []
    for r in results:
        lat = r["latency"]
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else None
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        done = f"{r['complete_jobs']}/{r['jobs']}"
        rows.append(
            [
                r["jobs"],
                f"{r['pods']}/{r['expected_pods']}",
                done if not r["timed_out"] else f"**{done}** (stopped at {r['pods_timeout']:.0f} s)",
                f"{r['cold_first_job_seconds']:.2f}",
                f"{r['burst_create_seconds']:.2f}",
                fmt(statistics.median(lat) if lat else None),
                fmt(p95),
                fmt(lat[-1] if lat else None),
                fmt(r["all_pods_seconds"]) if not r["timed_out"] else f"> {r['pods_timeout']:.0f}",
                r["s3_clients_built"],
                f"{1000 * r['s3_client_build_seconds'] / max(1, r['s3_clients_built']):.2f}",
                r["boto3_clients"],
                f"{r['rss_idle']:.0f}",
                f"{r['rss_after']:.0f}",
                f"{r['rss_settled']:.0f}",
                f"{(r['rss_settled'] - r['rss_idle']) / r['jobs']:.2f}",
                f"{r['emulator_rss']:.0f}" if r.get("emulator_rss") else "-",
                f"{r['worker_cpu_seconds']:.1f}",
                f"{r['emulator_cpu_seconds']:.1f}",
            ]
        )
    table = mlbench.md_table(
        [
            "jobs",
            "pods",
            "jobs with all pods",
            "cold first job s",
            "create burst s",
            "job→pods p50 s",
            "p95 s",
            "max s",
            "all pods s",
            "Bucket objects built",
            "ms per Bucket",
            "boto3 clients held",
            "RSS idle MiB",
            "RSS after MiB",
            "RSS settled MiB",
            "Δ MiB per job",
            "emulator RSS MiB",
            "burst CPU s, operator process",
            "burst CPU s, emulator",
        ],
        rows,
    )
    peft_note = (
        "peft/torch were importable by the operator (--with-peft)"
        if args.with_peft
        else "peft is hidden from the operator process, as in the operator image (no torch there): spec checks "
        "use fedtune's static tables; with peft installed the first job would also import peft and torch "
        "(seconds, ~300 MiB)"
    )
    torch_note = ", ".join(sorted({"yes" if r["torch_imported"] else "no" for r in results}))
    return f"""# Operator scale: FederatedJob creation to pods, and operator memory

{"**SMOKE RUN** (few jobs, 2 parties): checks the script, not a measurement." if args.smoke else ""}

The real operator (kopf, `fedtune.k8s.operator`, default settings but metrics off) against the
test suite's Kubernetes API emulator (kmock, in its own process), with a real SeaweedFS holding the
buckets. {args.parties} Parties, each in every job; every job wants {args.parties + 1} pods
({args.parties} trainers + 1 aggregator). Nothing runs in the pods: jobs stay in their init round.

{table}

- job→pods: from the job's create call returning to the watch event of its last pod (jobs that got
  all their pods; a row stopped at its time limit counts the others as incomplete); all jobs of a
  row are created in one burst (create burst s = how long the create calls took); all pods s =
  from the first create to the last pod of the burst. Before each burst one warm-up job runs alone
  (cold first job s: the operator's first job pays one-time costs) and is not counted in the row.
- {peft_note}; torch imported by the operator process: {torch_note}.
- Memory: resident set size (VmRSS from /proc, not tracemalloc) of the worker process that runs the
  operator thread (plus a pod watch and a small REST client; the emulator and SeaweedFS are other
  processes). idle = Parties Ready and the warm-up job's pods created; after = the moment the last
  pod appeared; settled = {args.settle:.0f} s later (the operator has written init tickets into mailboxes and keeps one
  daemon per job). Δ per job = (settled − idle) / jobs. Each row is a fresh worker and emulator.
- burst CPU s: CPU time (user + system) from the first create to the last pod (or the limit), of the
  operator's process and of the emulator's; with 2 cores, when their sum nears 2 × all pods s the
  machine, not waiting, is the limit.
- Bucket objects built: `fedtune.storage.s3.Bucket`s the operator constructed (one per party and
  one for the coordinator, per reconcile) from the start of the burst until its pods were all there
  (or the limit), and the mean wall time of one; boto3 clients held: the S3 clients behind them,
  shared per endpoint and credentials (a fresh boto3 session per Bucket used to cost ~0.3 s and
  ~12 MiB each).
- Per job the operator creates 5 kinds of child per pod (ServiceAccount, Role, RoleBinding, mailbox
  Secret, Pod), all through the API server; the emulator is a Python process, slower than a real
  kube-apiserver, so latencies here are an upper bound of the operator's own cost on this machine.
- Shared 2-core machine (other engineers' tests run alongside): see the load averages below.

Total wall time of this benchmark: {total:.0f} s.

![operator scale](operator_scale.png)

## Machine

{mlbench.machine_md(info)}

Command: `python bench/operator_scale.py {" ".join(sys.argv[1:])}`
"""


def plot(results: list[dict], path: Path) -> None:
    """Latency and operator memory against the number of jobs in the burst."""
    plt = mlbench.pyplot()

    jobs = [r["jobs"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    median = [statistics.median(r["latency"]) if r["latency"] else float("nan") for r in results]
    worst = [r["latency"][-1] if r["latency"] else float("nan") for r in results]
    everything = [r["all_pods_seconds"] if r["all_pods_seconds"] is not None else float("nan") for r in results]
    left.plot(jobs, median, "o-", label="job → its pods, median")
    left.plot(jobs, worst, "^--", label="job → its pods, max")
    left.plot(jobs, everything, "s:", label="burst → all pods")
    left.set_xlabel("jobs created at once")
    left.set_ylabel("seconds")
    left.set_title("FederatedJob to pods")
    left.legend(fontsize=7)
    for key, label in (("rss_idle", "idle"), ("rss_after", "after the burst"), ("rss_settled", "settled")):
        right.plot(jobs, [r[key] for r in results], "o-", label=label)
    right.set_ylim(bottom=0)
    right.set_xlabel("jobs created at once")
    right.set_ylabel("operator process RSS, MiB")
    right.set_title("Operator memory")
    right.legend(fontsize=7)
    mlbench.save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="1 and 2 jobs of 2 parties")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--jobs", default="1,10,50", help="comma list of burst sizes")
    ap.add_argument("--parties", type=int, default=4)
    ap.add_argument("--settle", type=float, default=None, help="seconds between 'after' and 'settled' (default 12)")
    ap.add_argument("--pods-timeout", type=float, default=None, help="longest wait for a burst's pods (s; default 420)")
    ap.add_argument(
        "--with-peft", action="store_true", help="let the operator import peft/torch for spec checks (not in its image)"
    )
    ap.add_argument("--emulator", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--emulator-pid", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emulator:
        emulator_main()
        return
    if args.worker:
        worker_main(args.worker, args.world, args.n, args.settle, args.with_peft, args.pods_timeout, args.emulator_pid)
        return
    if args.smoke:
        args.jobs, args.parties = "1,2", 2
    if args.pods_timeout is None:
        args.pods_timeout = 120.0 if args.smoke else 420.0
    if args.settle is None:
        args.settle = 2.0 if args.smoke else 12.0  # above the operator's 10 s resync

    from fedtune.storage.s3 import Bucket, S3Credentials
    from fedtune.storage.seaweed import Identity, SeaweedServer

    info = mlbench.machine_info(["kopf", "kmock"])
    started = time.perf_counter()
    names = [HUB] + [f"p{i}" for i in range(args.parties)]
    creds = {n: S3Credentials.generate() for n in names}
    tmp = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    server = SeaweedServer(tmp / "s3", [Identity(n, c, [f"{n}-bkt"]) for n, c in creds.items()])
    server.start()
    results = []
    try:
        for n in names:
            Bucket(server.storage(f"{n}-bkt"), creds[n]).ensure(create=True)
        world = tmp / "world.json"
        world.write_text(
            json.dumps(
                {
                    "endpoint": server.endpoint,
                    "parties": names[1:],
                    "creds": {
                        n: {"access_key_id": c.access_key_id, "secret_access_key": c.secret_access_key}
                        for n, c in creds.items()
                    },
                }
            )
        )
        for jobs in (int(x) for x in args.jobs.split(",")):
            print(f"{jobs} job(s) …", file=sys.stderr, flush=True)
            results.append(one_scale(jobs, world, args.settle, args.pods_timeout, args.with_peft))
    finally:
        server.stop()
    text = report(args, results, info, time.perf_counter() - started)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "operator_scale.json").write_text(json.dumps(results, indent=1))
    plot(results, Path(args.out) / "operator_scale.png")
    print(f"written to {mlbench.write_result(args.out, 'operator_scale.md', text)}", file=sys.stderr)


if __name__ == "__main__":
    main()
