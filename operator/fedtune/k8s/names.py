"""Deterministic names and labels of the objects the operator creates for a FederatedJob.

Every child is found again by name after an operator restart, so names are pure functions of the
job's and party's identity, never random. All names are DNS-1123 labels (lowercase alphanumerics
and '-', at most 63 characters): pod names become hostnames, which are labels.

Trainer names always carry a short hash of (job namespace, job name, party namespace, party name):
the readable part alone is ambiguous. Two coordinator namespaces may run jobs of the same name on
one party namespace, and dash-joined parts collide ("a-b" + "c" vs "a" + "b-c"). The aggregator is
unique per job in the job's own namespace, so its name only gets a hash when it had to be shortened.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

APP = "fedtune"
MAX_NAME = 63
HASH_LEN = 8

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "fedtune.io/job"
LABEL_JOB_NAMESPACE = "fedtune.io/job-namespace"
LABEL_JOB_UID = "fedtune.io/job-uid"
LABEL_PARTY = "fedtune.io/party"

_NOT_DNS = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def short_hash(*parts: str) -> str:
    """A stable 8-hex-digit digest of `parts` (NUL-separated, so part boundaries count)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:HASH_LEN]


def dns_label(readable: str, *, suffix: str = "", identity: tuple[str, ...] | None = None) -> str:
    """`readable` + `suffix` made a DNS-1123 label of at most 63 characters.

    Characters outside [a-z0-9-] become '-'. A hash of `identity` (default: the raw readable text)
    is inserted before the suffix when `identity` is given, or when sanitising or truncating changed
    the text, so distinct inputs never share a name. `suffix` must itself be DNS-safe.
    """
    cleaned = _NOT_DNS.sub("-", readable.lower()).strip("-")
    must_hash = identity is not None or cleaned != readable or len(cleaned) + len(suffix) > MAX_NAME
    if not must_hash:
        return cleaned + suffix
    digest = short_hash(*(identity if identity is not None else (readable,)))
    room = MAX_NAME - len(suffix) - HASH_LEN - 1
    head = cleaned[:room].rstrip("-")
    return f"{head}-{digest}{suffix}" if head else f"{digest}{suffix}"


def label_value(value: str) -> str:
    """`value` as a valid label value (≤63, alphanumeric ends); shortened with a hash when needed."""
    if len(value) <= MAX_NAME and _LABEL_VALUE.match(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[: MAX_NAME - HASH_LEN - 1].strip("-_.")
    return f"{cleaned}-{short_hash(value)}" if cleaned else short_hash(value)


def split_party_key(party_key: str) -> tuple[str, str]:
    """("namespace", "name") of a "namespace/name" party key."""
    namespace, sep, name = party_key.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"party key {party_key!r} must be 'namespace/name'")
    return namespace, name


@dataclass(frozen=True)
class ChildNames:
    """Names of one pod's objects; all of them live in `namespace`.

    Pod, ServiceAccount and the mailbox Secret/Role/RoleBinding are different kinds, so they
    could share one name; the `-mailbox` suffix is there for the human reading `kubectl get`.
    """

    namespace: str
    pod: str
    service_account: str
    role: str
    role_binding: str
    secret: str

    @property
    def mailbox_uri(self) -> str:
        """What the pod is told to read: `k8s://<namespace>/<secret>`."""
        return f"k8s://{self.namespace}/{self.secret}"


def _child_names(namespace: str, base: str, identity: tuple[str, ...] | None) -> ChildNames:
    pod = dns_label(base, identity=identity)
    mailbox = dns_label(base, suffix="-mailbox", identity=identity)
    return ChildNames(namespace, pod=pod, service_account=pod, role=mailbox, role_binding=mailbox, secret=mailbox)


def trainer_names(job_namespace: str, job_name: str, party_key: str) -> ChildNames:
    """Names of the trainer pod of `party_key` ("ns/name") in job `job_namespace/job_name`.

    They live in the party's namespace (data and compute belong to the party).
    """
    party_ns, party_name = split_party_key(party_key)
    identity = (job_namespace, job_name, party_ns, party_name)
    return _child_names(party_ns, f"{APP}-{job_name}-{party_name}", identity)


def aggregator_names(job_namespace: str, job_name: str) -> ChildNames:
    """Names of the aggregator pod of a job; they live in the job's namespace."""
    return _child_names(job_namespace, f"{APP}-{job_name}-aggregator", None)


def job_selector(job_namespace: str, job_name: str) -> dict[str, str]:
    """Labels that select every child of one job, across namespaces (owner refs cannot cross them)."""
    return {
        LABEL_NAME: APP,
        LABEL_JOB: label_value(job_name),
        LABEL_JOB_NAMESPACE: label_value(job_namespace),
    }


def _labels(component: str, job_namespace: str, job_name: str, job_uid: str | None) -> dict[str, str]:
    labels = {**job_selector(job_namespace, job_name), LABEL_COMPONENT: component, LABEL_MANAGED_BY: "fedtune-operator"}
    if job_uid:  # absent before the API server assigned one; the name pair is then the identity
        labels[LABEL_JOB_UID] = label_value(job_uid)
    return labels


def trainer_labels(job_namespace: str, job_name: str, job_uid: str | None, party_key: str) -> dict[str, str]:
    """Labels of every object of a party's trainer pod."""
    _, party_name = split_party_key(party_key)
    return {**_labels("trainer", job_namespace, job_name, job_uid), LABEL_PARTY: label_value(party_name)}


def aggregator_labels(job_namespace: str, job_name: str, job_uid: str | None) -> dict[str, str]:
    """Labels of every object of the job's aggregator pod."""
    return _labels("aggregator", job_namespace, job_name, job_uid)
