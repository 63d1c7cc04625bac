"""Operator scale: time from FederatedJob creation to all its pods, and operator memory and CPU, for 1/10/50 jobs.

    python bench/operator_scale.py [--smoke] [--out bench/results] [--jobs 1,10,50] [--parties 4]

The real operator (`fedtune.k8s.operator`, kopf) runs against a real control plane (etcd,
kube-apiserver and kube-controller-manager from tests/kube_cluster.py; binaries from
scripts/build-kube.sh) as the operator chart's ServiceAccount, with a real SeaweedFS for the
Parties' and the coordinator's buckets. No pod runs (no scheduler, no kubelet): the benchmark only
watches pod creations.

Processes, so that each number belongs to one thing:
- this script: SeaweedFS (its own process), and per scale a fresh control plane (CRDs, the chart's
  RBAC, the operator's namespace, a Node, a hub namespace and one per Party, PodSecurity
  `restricted`, the Parties and their credentials) and a fresh worker;
- the control plane: etcd, kube-apiserver, kube-controller-manager, each its own process; their
  CPU time and the API server's resident set come from /proc/PID;
- the worker (`--worker`): the operator in a thread (kopf logged in with a TokenRequest token of
  the chart's ServiceAccount, `KUBECONFIG` naming the same identity for fedtune's own client),
  plus a pod watch and the admin's REST client that creates the jobs. Memory is this worker's
  resident set (VmRSS from /proc, not tracemalloc): "idle" once every Party is Ready and a warm-up
  job's pods exist, "after" once every job's pods exist, "settled" a resync period later.

Per job: N x (parties + 1) pods (one trainer per party, one aggregator). All jobs of a scale are
created in one burst; a job's latency runs from its create call returning to the ADDED watch event
of its last pod. Every Party takes part in every job (an organisation in many federations). The
API server's audit log gives the operator's requests during the burst: how many of each verb and
resource, and how long the server took over them.

The same measurement against the earlier in-process API emulator (which the tests used before the
real control plane) is kept in results/operator_scale_emulator.json (an earlier run, its machine
noted there); the report puts its figures beside these, per scale.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlbench

sys.path.insert(0, str(mlbench.ROOT / "tests"))  # the control plane and its clients live with the test harness
MANAGED = "app.kubernetes.io/managed-by=fedtune-operator"
EMULATOR_RESULTS = Path(__file__).resolve().parent / "results" / "operator_scale_emulator.json"
CONTROL_PLANE = ("kube-apiserver", "etcd", "kube-controller-manager")


def rss_mib() -> dict[str, float]:
    """Resident set now and its peak (VmRSS, VmHWM) of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


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


# --- the world: one fresh control plane per scale -----------------------------------------------------


def _job(name: str, world: dict) -> dict:
    return {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name, "namespace": world["hub"]},
        "spec": {
            "model": {"source": mlbench.MINILM, "task": "sequence-classification"},
            "peft": {"method": "lora", "config": dict(mlbench.LORA)},
            "data": {"labels": mlbench.SENTIMENT, "maxLength": 64},
            "storage": {"endpoint": world["endpoint"], "bucket": "hub-bkt", "credentialsSecret": {"name": "hub-s3"}},
            "rounds": 3,
            "minParties": len(world["parties"]),
            "roundTimeoutSeconds": 3600,
            "parties": [{"name": p, "namespace": ns} for p, ns in world["parties"].items()],
        },
    }


def build_world(cluster, workdir: Path, endpoint: str, creds: dict, parties: list[str]) -> dict:
    """fedtune installed on a fresh cluster (CRDs, the chart's RBAC), a Node, the hub's and every
    Party's namespace (PodSecurity `restricted`), their S3 credentials and the Parties; what the
    worker needs to reach it all, as JSON-ready values."""
    from kube import RESTRICTED, Identity, Kube, KubeTest, install_fedtune, secret_doc

    operator = install_fedtune(Kube(cluster, Identity("admin", cert=cluster.admin_cert), workdir))
    kube = KubeTest(cluster, workdir, operator, "bench")
    kube.node("cpu-1", cpu="1000", memory="4000Gi")

    def namespace(name: str) -> str:
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": RESTRICTED}})
        return name

    def secret(ns: str, name: str, c) -> None:
        kube.create(secret_doc(ns, name, {"accessKeyId": c.access_key_id, "secretAccessKey": c.secret_access_key}))

    hub = namespace("hub")
    secret(hub, "hub-s3", creds["hub"])
    world = {"hub": hub, "parties": {}, "endpoint": endpoint}
    for p in parties:
        ns = world["parties"][p] = namespace(f"org-{p}")
        secret(ns, "s3", creds[p])
        kube.create(
            {
                "apiVersion": "fedtune.io/v1alpha1",
                "kind": "Party",
                "metadata": {"name": p, "namespace": ns},
                "spec": {
                    "storage": {"endpoint": endpoint, "bucket": f"{p}-bkt", "credentialsSecret": {"name": "s3"}},
                    "data": {"trainKey": "train.jsonl", "evalKey": "eval.jsonl"},
                    "compute": {"cpu": "1", "memory": "1Gi"},
                    "consent": {"allowedNamespaces": [hub]},
                },
            }
        )
    world["cluster"] = {"bin": str(cluster.bin), "dir": str(cluster.dir), "url": cluster.url}
    world["operator"] = {"name": operator.name, "token": operator.token}
    world["pids"] = {name: cluster.procs[name].pid for name in CONTROL_PLANE}
    return world


# --- the worker process: the operator, a pod watch, the burst ------------------------------------------


class PodWatch:
    """Records the arrival time of every pod the operator creates (one watch, resumed from its resourceVersion)."""

    def __init__(self, kube):
        import urllib3

        cert, key = kube.identity.cert
        self.http = urllib3.PoolManager(ca_certs=str(kube.cluster.ca_file), cert_file=str(cert), key_file=str(key))
        self.url = kube.url + kube.path("pods")
        self.added: dict[tuple[str, str], tuple[float, str | None]] = {}  # (namespace, name) -> (seconds, job)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import urllib3

        version = ""
        while not self._stop.is_set():
            fields = {"watch": "true", "labelSelector": MANAGED, "timeoutSeconds": "30"}
            resp = self.http.request(
                "GET",
                self.url,
                fields={**fields, **({"resourceVersion": version} if version else {})},
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
                    obj = ev.get("object", {})
                    if ev.get("type") == "ERROR":  # 410 Gone: the version is too old; list afresh
                        version = ""
                        continue
                    meta = obj.get("metadata", {})
                    version = meta.get("resourceVersion", version)
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


def worker_main(world_path: str, jobs: int, settle: float, with_peft: bool, pods_timeout: float) -> None:
    """Start the operator, create `jobs` jobs at once, print one RESULT line."""
    os.environ["FEDTUNE_METRICS_PORT"] = "0"  # several operators in a row: no fixed port
    if not with_peft:
        # The operator image has no peft/torch; here they are installed, and the spec check would
        # import them (~300 MiB, seconds). Hide peft so the operator runs as it does in its image.
        sys.modules["peft"] = None  # type: ignore[assignment]
    from kube import Identity, KubeTest
    from kube_cluster import KubeCluster

    builds = ClientBuilds()
    world = json.loads(Path(world_path).read_text())
    parties = world["parties"]
    cluster = KubeCluster(Path(world["cluster"]["bin"]), Path(world["cluster"]["dir"]))
    cluster.url = world["cluster"]["url"]  # started by the driver: a client's view of it
    kube = KubeTest(cluster, Path(world_path).parent, Identity(**world["operator"]), "bench")
    pids = world["pids"]
    server_pid = pids["kube-apiserver"]
    with kube.run_kopf("fedtune.k8s.operator"):
        kube.wait_for(
            lambda: all(
                ((kube.get("parties", ns, p) or {}).get("status") or {}).get("phase") == "Ready"
                for p, ns in parties.items()
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
        kube.create(_job("warm-up", world))
        kube.wait_for(lambda: len(watch.added) >= per_job, timeout=300, what="the warm-up job's pods")
        cold = max(t for t, _ in watch.added.values()) - start
        time.sleep(settle)
        idle, server_idle = rss_mib(), proc_rss_mib(server_pid)
        created = {}
        builds.reset()
        burst_start = time.perf_counter()
        cpu_start = time.process_time()
        plane_start = {name: proc_cpu_seconds(pid) for name, pid in pids.items()}
        for i in range(jobs):
            name = f"fj-{i:03d}"
            kube.create(_job(name, world))
            created[name] = time.perf_counter()
        expected = (jobs + 1) * per_job
        deadline = burst_start + pods_timeout
        while len(watch.added) < expected and time.perf_counter() < deadline:
            time.sleep(0.1)
        burst_seconds = time.perf_counter() - burst_start
        worker_cpu = time.process_time() - cpu_start
        plane_cpu = {name: proc_cpu_seconds(pid) - plane_start[name] for name, pid in pids.items()}
        client_builds, client_seconds = builds.count, builds.seconds
        from fedtune.storage import s3

        boto_clients = len(s3._clients._clients)
        after, server_after = rss_mib(), proc_rss_mib(server_pid)
        time.sleep(settle)
        settled, server_settled = rss_mib(), proc_rss_mib(server_pid)
        per: dict[str, list[float]] = {}
        for seconds, job in watch.added.values():
            per.setdefault(job, []).append(seconds)
        complete = {j: max(per[j]) for j in created if len(per.get(j, [])) >= per_job}
        result = {
            "jobs": jobs,
            "parties": len(parties),
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
            "apiserver_cpu_seconds": plane_cpu["kube-apiserver"],
            "etcd_cpu_seconds": plane_cpu["etcd"],
            "controller_manager_cpu_seconds": plane_cpu["kube-controller-manager"],
            "burst_seconds": burst_seconds,
            "rss_before_first_job": cold_rss["VmRSS"],
            "rss_idle": idle["VmRSS"],
            "rss_after": after["VmRSS"],
            "rss_settled": settled["VmRSS"],
            "rss_peak": settled["VmHWM"],
            "apiserver_rss_idle": server_idle,
            "apiserver_rss_after": server_after,
            "apiserver_rss_settled": server_settled,
            "torch_imported": "torch" in sys.modules,
        }
        print("RESULT " + json.dumps(result), flush=True)
        watch.stop()
    # The operator stopped cleanly; nothing else to release (the control plane is the parent's).


# --- the driver ------------------------------------------------------------------------------------


def one_scale(jobs: int, tmp: Path, server, creds: dict, args) -> dict:
    """A fresh control plane and worker for one burst of `jobs` jobs; the worker's result."""
    from kube_cluster import KubeCluster, kube_bin_dir

    workdir = tmp / f"scale-{jobs}"
    workdir.mkdir()
    cluster = KubeCluster(kube_bin_dir(), workdir / "cluster")
    started = time.perf_counter()
    cluster.start()
    try:
        parties = [n for n in creds if n != "hub"]
        world = build_world(cluster, workdir, server.endpoint, creds, parties)
        setup_seconds = time.perf_counter() - started
        world_path = workdir / "world.json"
        world_path.write_text(json.dumps(world))
        worker = subprocess.run(
            [sys.executable, __file__, "--worker", str(world_path), "--n", str(jobs)]
            + ["--settle", str(args.settle), "--pods-timeout", str(args.pods_timeout)]
            + (["--with-peft"] if args.with_peft else []),
            capture_output=True,
            text=True,
            timeout=args.pods_timeout + 300,
        )
        lines = [ln for ln in worker.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(
                f"worker for {jobs} job(s) failed (rc {worker.returncode}; control-plane logs in {cluster.dir}):\n"
                f"{worker.stderr[-4000:]}"
            )
        result = json.loads(lines[-1][len("RESULT ") :])
        result["cluster_setup_seconds"] = setup_seconds
        result["operator_requests"] = burst_requests(cluster.audit_log, world["operator"]["name"], result)
        return result
    finally:
        cluster.stop()


def burst_requests(audit_log: Path, user: str, result: dict) -> dict[str, dict[str, float]]:
    """The operator's API requests during the burst, from the API server's audit log: per verb and
    resource, how many and how long the server took (received to response complete), median and p95."""
    events = [json.loads(line) for line in audit_log.read_text().splitlines() if line.strip()]
    when = lambda e, key: datetime.datetime.fromisoformat(e[key]).timestamp()  # noqa: E731
    start = next(
        when(e, "requestReceivedTimestamp")
        for e in events
        if e.get("verb") == "create" and e.get("objectRef", {}).get("name") == "fj-000"
    )
    end = start + result["burst_seconds"]
    took: dict[str, list[float]] = {}
    for e in events:
        if e.get("stage") != "ResponseComplete" or e["user"].get("username") != user or e["verb"] == "watch":
            continue
        if start <= when(e, "requestReceivedTimestamp") <= end:
            ref = e.get("objectRef", {})
            resource = "/".join(filter(None, (ref.get("resource", e["requestURI"]), ref.get("subresource"))))
            took.setdefault(f"{e['verb']} {resource}", []).append(
                1000 * (when(e, "stageTimestamp") - when(e, "requestReceivedTimestamp"))
            )
    return {
        key: {"count": len(ms), "median_ms": statistics.median(ms), "p95_ms": _p95(sorted(ms))}
        for key, ms in sorted(took.items())
    }


def requests_table(r: dict) -> str:
    rows = [
        [key, v["count"], f"{v['count'] / r['jobs']:.1f}", f"{v['median_ms']:.1f}", f"{v['p95_ms']:.1f}"]
        for key, v in sorted(r["operator_requests"].items(), key=lambda kv: -kv[1]["count"] * kv[1]["median_ms"])
    ]
    return mlbench.md_table(["operator request", "count", "per job", "server median ms", "server p95 ms"], rows)


def controllers_text() -> str:
    """The controllers kube-controller-manager runs (tests/kube_cluster.py CONTROLLERS, its --controllers)."""
    from kube_cluster import CONTROLLERS

    names = [c.removesuffix("-controller") for c in CONTROLLERS]
    return ", ".join(names[:-1]) + " and " + names[-1]


def emulator_figures() -> dict | None:
    """The earlier run against the in-process API emulator (results/operator_scale_emulator.json)."""
    if not EMULATOR_RESULTS.exists():
        return None
    return json.loads(EMULATOR_RESULTS.read_text())


def _p95(lat: list[float]) -> float | None:
    return lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else None


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def comparison(results: list[dict], emulator: dict | None) -> str:
    """Per scale (jobs x parties): the emulator's earlier figures, then this run's."""

    def row(r: dict, server: str, server_rss: float | None, server_cpu: float | None) -> list:
        lat = r["latency"]
        return [
            f"{r['jobs']} × {r['expected_pods'] // r['jobs'] - 1}",
            server,
            _fmt(statistics.median(lat) if lat else None),
            _fmt(_p95(lat)),
            _fmt(lat[-1] if lat else None),
            _fmt(r["all_pods_seconds"]),
            f"{r['rss_idle']:.0f}",
            f"{r['rss_settled']:.0f}",
            f"{(r['rss_settled'] - r['rss_idle']) / r['jobs']:.2f}",
            _fmt(r["worker_cpu_seconds"], 1),
            _fmt(server_rss, 0),
            _fmt(server_cpu, 1),
        ]

    earlier = {(r["jobs"], r["expected_pods"]): r for r in (emulator or {}).get("results", [])}
    rows = []
    for r in results:
        old = earlier.get((r["jobs"], r["expected_pods"]))
        if old:
            rows.append(row(old, "emulator (earlier run)", old["emulator_rss"], old["emulator_cpu_seconds"]))
        rows.append(row(r, "kube-apiserver", r["apiserver_rss_settled"], r["apiserver_cpu_seconds"]))
    return mlbench.md_table(
        [
            "jobs × parties",
            "API server",
            "job→pods p50 s",
            "p95 s",
            "max s",
            "all pods s",
            "operator RSS idle MiB",
            "RSS settled MiB",
            "Δ MiB per job",
            "burst CPU s, operator process",
            "API server RSS MiB",
            "burst CPU s, API server",
        ],
        rows,
    )


def report(args, results: list[dict], info: dict, total: float, emulator: dict | None) -> str:
    rows = []
    for r in results:
        lat = r["latency"]
        done = f"{r['complete_jobs']}/{r['jobs']}"
        rows.append(
            [
                r["jobs"],
                f"{r['pods']}/{r['expected_pods']}",
                done if not r["timed_out"] else f"**{done}** (stopped at {r['pods_timeout']:.0f} s)",
                f"{r['cold_first_job_seconds']:.2f}",
                f"{r['burst_create_seconds']:.2f}",
                _fmt(statistics.median(lat) if lat else None),
                _fmt(_p95(lat)),
                _fmt(lat[-1] if lat else None),
                _fmt(r["all_pods_seconds"]) if not r["timed_out"] else f"> {r['pods_timeout']:.0f}",
                r["s3_clients_built"],
                f"{1000 * r['s3_client_build_seconds'] / max(1, r['s3_clients_built']):.2f}",
                r["boto3_clients"],
                f"{r['rss_idle']:.0f}",
                f"{r['rss_after']:.0f}",
                f"{r['rss_settled']:.0f}",
                f"{(r['rss_settled'] - r['rss_idle']) / r['jobs']:.2f}",
                f"{r['worker_cpu_seconds']:.1f}",
                f"{r['apiserver_rss_idle']:.0f} / {r['apiserver_rss_after']:.0f} / {r['apiserver_rss_settled']:.0f}",
                f"{r['apiserver_cpu_seconds']:.1f}",
                f"{r['etcd_cpu_seconds']:.1f}",
                f"{r['controller_manager_cpu_seconds']:.1f}",
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
            "burst CPU s, operator process",
            "kube-apiserver RSS idle / after / settled MiB",
            "burst CPU s, kube-apiserver",
            "burst CPU s, etcd",
            "burst CPU s, controller-manager",
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
    if emulator:
        old = emulator["machine"]
        emulator_note = (
            f"The emulator rows come from an earlier run (`{emulator['command']}`, {emulator['measured']}) against "
            f"{emulator['server']}, on {old['cpu']} with "
            f"{old['cores (os.cpu_count)']} cores, load average {old['load average (1/5/15 min) at start']} at its "
            "start; they are read from [operator_scale_emulator.json](operator_scale_emulator.json), not measured "
            "now. Only scales with the same jobs and parties are paired."
        )
    else:
        emulator_note = "No emulator figures were found (results/operator_scale_emulator.json)."
    return f"""# Operator scale: FederatedJob creation to pods, operator memory and CPU

{"**SMOKE RUN** (one job): checks the script, not a measurement." if args.smoke else ""}

The real operator (kopf, `fedtune.k8s.operator`, default settings but metrics off) against a real
control plane ({info["kube-apiserver"]}, {info["etcd"]}, and kube-controller-manager running only the
{controllers_text()} controllers; TLS, RBAC, PodSecurity admission), logged in as the
operator chart's ServiceAccount with a TokenRequest token, with a real SeaweedFS holding the
buckets. {args.parties} Parties, each in every job and each in its own namespace (PodSecurity
`restricted` enforced); every job wants {args.parties + 1} pods ({args.parties} trainers + 1
aggregator). Nothing runs the pods (no scheduler, no kubelet): jobs stay in their init round.

## Emulator and real API server, per scale

{comparison(results, emulator)}

{emulator_note}

## This run

{table}

- job→pods: from the job's create call returning to the watch event of its last pod (jobs that got
  all their pods; a row stopped at its time limit counts the others as incomplete); all jobs of a
  row are created in one burst (create burst s = how long the create calls took); all pods s =
  from the first create to the last pod of the burst. Before each burst one warm-up job runs alone
  (cold first job s: the operator's first job pays one-time costs) and is not counted in the row.
- {peft_note}; torch imported by the operator process: {torch_note}.
- Memory: resident set size (VmRSS from /proc, not tracemalloc) of the worker process that runs the
  operator thread (plus a pod watch and the REST client creating the jobs; the control plane and
  SeaweedFS are other processes). idle = Parties Ready and the warm-up job's pods created; after =
  the moment the last pod appeared; settled = {args.settle:.0f} s later (the operator has written init tickets
  into mailboxes and keeps one daemon per job). Δ per job = (settled − idle) / jobs. The API
  server's resident set is read from /proc at the same three moments. Each row is a fresh worker
  and a fresh control plane (started, fedtune's CRDs and RBAC installed, world built: see
  `cluster_setup_seconds` in the JSON).
- burst CPU s: CPU time (user + system, /proc/PID/stat) from the first create to the last pod (or
  the limit), of the operator's process and of each control-plane process; with 2 cores, when
  their sum nears 2 × all pods s the machine, not waiting, is the limit.
- Bucket objects built: `fedtune.storage.s3.Bucket`s the operator constructed (one per party and
  one for the coordinator, per reconcile) from the start of the burst until its pods were all there
  (or the limit), and the mean wall time of one; boto3 clients held: the S3 clients behind them,
  shared per endpoint and credentials.
- Per job the operator creates 5 kinds of child per pod (ServiceAccount, Role, RoleBinding, mailbox
  Secret, Pod), all through the API server, which authenticates, authorizes (RBAC), admits
  (PodSecurity, ServiceAccount, ...) and stores each in etcd; the controller-manager's garbage
  collector watches them all.
- Shared 2-core machine (other engineers' tests run alongside): see the load averages below.

## The operator's API requests during the burst of {results[-1]["jobs"]} job(s)

{requests_table(results[-1])}

From the API server's audit log: the operator's requests (watches left out) received from the first
create of the burst until its last pod, per verb and resource; server ms = from the request's
arrival to its response, as the audit log stamps them. The operator's ServiceAccount holds no
`escalate` or `bind` verb (operator/fedtune/k8s/permissions.py), so the server checks every Role
and RoleBinding it creates against the operator's own permissions.

Total wall time of this benchmark: {total:.0f} s.

![operator scale](operator_scale.png)

## Machine

{mlbench.machine_md(info)}

Command: `python bench/operator_scale.py {" ".join(sys.argv[1:])}`
"""


def plot(results: list[dict], emulator: dict | None, path: Path) -> None:
    """Latency, operator memory and burst CPU against the number of jobs, with the emulator's earlier figures."""
    plt = mlbench.pyplot()

    nan = float("nan")
    jobs = [r["jobs"] for r in results]
    parties = results[0]["expected_pods"] // results[0]["jobs"] - 1
    old = sorted(
        (r for r in (emulator or {}).get("results", []) if r["expected_pods"] // r["jobs"] - 1 == parties),
        key=lambda r: r["jobs"],
    )
    old_jobs = [r["jobs"] for r in old]
    median = lambda rs: [statistics.median(r["latency"]) if r["latency"] else nan for r in rs]  # noqa: E731
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.8))
    left.plot(jobs, median(results), "o-", label="job → its pods, median")
    left.plot(jobs, [r["latency"][-1] if r["latency"] else nan for r in results], "^--", label="job → its pods, max")
    left.plot(jobs, [r["all_pods_seconds"] or nan for r in results], "s:", label="burst → all pods")
    if old:
        left.plot(old_jobs, median(old), "o-", color="grey", alpha=0.6, label="emulator (earlier), median")
    left.set_xlabel("jobs created at once")
    left.set_ylabel("seconds")
    left.set_title("FederatedJob to pods")
    left.legend(fontsize=7)
    for key, label in (("rss_idle", "idle"), ("rss_after", "after the burst"), ("rss_settled", "settled")):
        middle.plot(jobs, [r[key] for r in results], "o-", label=label)
    if old:
        middle.plot(old_jobs, [r["rss_settled"] for r in old], "o-", color="grey", alpha=0.6, label="emulator, settled")
    middle.set_ylim(bottom=0)
    middle.set_xlabel("jobs created at once")
    middle.set_ylabel("operator process RSS, MiB")
    middle.set_title("Operator memory")
    middle.legend(fontsize=7)
    right.plot(jobs, [r["worker_cpu_seconds"] for r in results], "o-", label="operator process")
    right.plot(jobs, [r["apiserver_cpu_seconds"] for r in results], "s-", label="kube-apiserver")
    right.plot(jobs, [r["etcd_cpu_seconds"] for r in results], "^:", label="etcd")
    if old:
        style = {"color": "grey", "alpha": 0.6}
        right.plot(old_jobs, [r["worker_cpu_seconds"] for r in old], "o--", **style, label="operator (emulator run)")
        right.plot(old_jobs, [r["emulator_cpu_seconds"] for r in old], "s--", **style, label="emulator")
    right.set_xlabel("jobs created at once")
    right.set_ylabel("CPU seconds during the burst")
    right.set_title("CPU")
    right.legend(fontsize=7)
    mlbench.save_figure(fig, path)


def control_plane_versions() -> dict[str, str]:
    from kube_cluster import kube_bin_dir

    out = {}
    for name in ("kube-apiserver", "etcd"):
        proc = subprocess.run(
            [str(kube_bin_dir() / name), "--version"], capture_output=True, text=True, check=True, timeout=30
        )
        out[name] = f"{name} {proc.stdout.split()[-1] if name == 'kube-apiserver' else proc.stdout.split()[2]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="1 job of 4 parties")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--jobs", default="1,10,50", help="comma list of burst sizes")
    ap.add_argument("--parties", type=int, default=4)
    ap.add_argument("--settle", type=float, default=None, help="seconds between 'after' and 'settled' (default 12)")
    ap.add_argument("--pods-timeout", type=float, default=None, help="longest wait for a burst's pods (s; default 420)")
    ap.add_argument(
        "--with-peft", action="store_true", help="let the operator import peft/torch for spec checks (not in its image)"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker, args.n, args.settle, args.with_peft, args.pods_timeout)
        return
    if args.smoke:
        args.jobs = "1"
    if args.pods_timeout is None:
        args.pods_timeout = 120.0 if args.smoke else 420.0
    if args.settle is None:
        args.settle = 2.0 if args.smoke else 12.0  # above the operator's 10 s resync

    from fedtune.storage.s3 import Bucket, S3Credentials
    from fedtune.storage.seaweed import Identity, SeaweedServer

    info = {**mlbench.machine_info(["kopf", "kubernetes"]), **control_plane_versions()}
    emulator = emulator_figures()
    started = time.perf_counter()
    names = ["hub"] + [f"p{i}" for i in range(args.parties)]
    creds = {n: S3Credentials.generate() for n in names}
    tmp = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    server = SeaweedServer(tmp / "s3", [Identity(n, c, [f"{n}-bkt"]) for n, c in creds.items()])
    server.start()
    results = []
    try:
        for n in names:
            Bucket(server.storage(f"{n}-bkt"), creds[n]).ensure(create=True)
        for jobs in (int(x) for x in args.jobs.split(",")):
            print(f"{jobs} job(s) …", file=sys.stderr, flush=True)
            results.append(one_scale(jobs, tmp, server, creds, args))
    finally:
        server.stop()
    shutil.rmtree(tmp, ignore_errors=True)  # kept, with the control-plane logs, when a scale failed
    total = time.perf_counter() - started
    text = report(args, results, info, total, emulator)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "server": f"{info['kube-apiserver']}, {info['etcd']}, kube-controller-manager (tests/kube_cluster.py)",
        "command": f"python bench/operator_scale.py {' '.join(sys.argv[1:])}".strip(),
        "total_seconds": total,
        "machine": info,
        "results": results,
    }
    (out / "operator_scale.json").write_text(json.dumps(doc, indent=1))
    plot(results, emulator, out / "operator_scale.png")
    print(f"written to {mlbench.write_result(out, 'operator_scale.md', text)}", file=sys.stderr)


if __name__ == "__main__":
    main()
