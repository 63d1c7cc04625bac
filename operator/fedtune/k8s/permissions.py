"""Every Kubernetes API permission the operator needs: the one table its RBAC is written from.

Kept exact, not merely sufficient, and checked both ways by tests:
- tests/test_helm_chart.py renders the charts and asserts their ClusterRole / Roles grant exactly
  these rules (cluster-wide mode: all of them; namespaced mode: the cluster-scoped rows in the
  ClusterRole, the namespaced rows in a Role per coordinator namespace, and `party_rows()` in the
  fedtune-party chart's Role in a party's namespace);
- tests/test_operator_rbac.py runs the real operator (kopf + fedtune's own client) through jobs
  against a real kube-apiserver, as a ServiceAccount bound by exactly the chart's RBAC, reads
  every request it sent from the server's audit log, and asserts each is covered here and none
  was refused, and each verb here was requested, except the `unrequested` ones, which are held
  for a reason stated in `why`; a chart missing a verb is shown to stop a job there.

Where the verbs come from:
- kopf: `watch`+`list` for every resource a handler serves (the FederatedJob daemon and delete
  handler, the Party handlers, the pod and mailbox-Secret event handlers wake a job); `patch` on
  FederatedJobs and Parties for its finalizer `fedtune.io/cleanup` and its progress/diff-base
  annotations (`fedtune.io/*`), `patch` on `parties/status` for the Party handler's status;
  `create` events (`kopf.event`, handler failures); `list`+`watch` CRDs to notice CRDs that
  appear after startup. kopf runs standalone (no peering objects). Namespaces are listed and
  watched only when the operator serves a list of namespaces (`fedtune operator --namespace`),
  to follow them; cluster-wide it never reads them.
- fedtune (`reconcile.py`, `preconditions.py`, `party_status.py`, `operator.py`): `get` the job,
  Parties, credential and mailbox Secrets, pods; `create` the per-pod ServiceAccount, Role,
  RoleBinding, mailbox Secret and Pod, and `get` each when create answers 409 (already there);
  `patch` tickets into mailboxes, the job's status and accepted-spec annotation; `list` nodes
  for the fit check; `list`+`delete` every child by label when a job is deleted or a pod failed.

Leader election (`leader.py`, on in the chart) has its own table, `LEADER_ELECTION`: a Role in the
operator's own namespace, on its one Lease where the verb allows a name. Only the operator process
(`fedtune operator`) elects, so tests/test_operator_failover.py checks that table the same two ways,
from the audit log of two such processes and a takeover (test_operator_rbac.py runs kopf alone).

In a party's namespace (namespaced mode: the fedtune-party chart's Role) no job lives: the operator
only watches FederatedJobs there (kopf watches each resource in every namespace it serves), so it
holds no other verb on them, and none on their status (`party_verbs`). The Role is installed by the
namespace's admins, who must hold every verb it grants (escalation prevention): the operator chart
adds its fedtune.io verbs to the built-in `admin` role, so whatever it grants there every namespace
admin gets too (writing a job's status, the operator's record of its rounds, must not be one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

RBAC = "rbac.authorization.k8s.io"
COORDINATION = "coordination.k8s.io"
FEDTUNE = "fedtune.io"
CLUSTER_SCOPED = frozenset({"nodes", "namespaces", "customresourcedefinitions"})


@dataclass(frozen=True)
class Permission:
    """verbs on one resource (with "/<subresource>" for a subresource) of one API group ("" = core)."""

    group: str
    resource: str
    verbs: tuple[str, ...]
    why: str
    unrequested: tuple[str, ...] = ()  # held, never requested by the operator: `why` says what for
    party_verbs: tuple[str, ...] | None = None  # held in a party's namespace: None = all `verbs`, () = none
    own_object: bool = False  # on the operator's own object only (resourceNames: the chart's full name)

    @property
    def cluster_scoped(self) -> bool:
        return self.resource.split("/")[0] in CLUSTER_SCOPED


PERMISSIONS: tuple[Permission, ...] = (
    Permission("", "pods", ("get", "list", "watch", "create", "delete"), "trainer/aggregator pods; kopf watches them"),
    Permission(
        "",
        "secrets",
        ("get", "list", "watch", "create", "patch", "update", "delete"),
        "credentials (read), mailboxes (create, patch tickets); kopf watches them. `update` is never "
        "requested: RBAC escalation prevention lets the operator create the mailbox Roles "
        "(get/watch/patch/update on one Secret) and bind them only if it holds those verbs itself",
        unrequested=("update",),
    ),
    Permission("", "serviceaccounts", ("get", "list", "create", "delete"), "one identity per pod"),
    Permission(RBAC, "roles", ("get", "list", "create", "delete"), "per-pod mailbox Role"),
    Permission(RBAC, "rolebindings", ("get", "list", "create", "delete"), "binds the mailbox Role to the pod"),
    Permission("", "events", ("create",), "kopf.event: rounds, retries, failures"),
    Permission(
        FEDTUNE,
        "federatedjobs",
        ("get", "list", "watch", "patch"),
        "daemon, finalizer, annotations; in a party's namespace kopf only watches (no job lives there)",
        party_verbs=("list", "watch"),
    ),
    Permission(FEDTUNE, "federatedjobs/status", ("patch",), "job status (coordinator namespaces)", party_verbs=()),
    Permission(FEDTUNE, "parties", ("get", "list", "watch", "patch"), "Party handlers (kopf annotations); jobs read"),
    Permission(FEDTUNE, "parties/status", ("patch",), "Party status (StorageReady, Ready)"),
    Permission("", "nodes", ("list",), "can some node hold the pod (check_nodes)"),
    Permission("", "namespaces", ("list", "watch"), "kopf, only with --namespace: follows the served namespaces"),
    Permission("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch"), "kopf notices new CRDs"),
)


# In the operator's own namespace, with leader election on (the operator chart's `leaderElection.enabled`).
LEADER_ELECTION: tuple[Permission, ...] = (
    Permission(
        COORDINATION,
        "leases",
        ("create",),
        "the first candidate creates the Lease; RBAC cannot limit create to a name",
    ),
    Permission(
        COORDINATION,
        "leases",
        ("get", "update"),
        "candidates read the Lease; the leader renews it, a standby takes it over once it expired",
        own_object=True,
    ),
)


def granted(group: str, resource: str, verb: str, table: tuple[Permission, ...] = PERMISSIONS) -> bool:
    """Whether `table` allows `verb` on `resource` (with "/<subresource>") of `group`."""
    return any(p.group == group and p.resource == resource and verb in p.verbs for p in table)


def triples(table: tuple[Permission, ...] = PERMISSIONS) -> set[tuple[str, str, str]]:
    """The table as a set of (group, resource, verb): the normal form that rule lists are compared in."""
    return {(p.group, p.resource, v) for p in table for v in p.verbs}


def cluster_rows() -> tuple[Permission, ...]:
    """Rows on cluster-scoped resources: always in the ClusterRole."""
    return tuple(p for p in PERMISSIONS if p.cluster_scoped)


def namespaced_rows() -> tuple[Permission, ...]:
    """Rows on namespaced resources: a Role per coordinator namespace when not cluster-wide."""
    return tuple(p for p in PERMISSIONS if not p.cluster_scoped)


def party_rows() -> tuple[Permission, ...]:
    """The namespaced rows as held in a party's namespace (the fedtune-party chart's Role): each row's
    `party_verbs`; rows left without a verb are dropped."""
    out = []
    for p in namespaced_rows():
        verbs = p.verbs if p.party_verbs is None else p.party_verbs
        if verbs:
            out.append(replace(p, verbs=verbs, unrequested=tuple(v for v in p.unrequested if v in verbs)))
    return tuple(out)
