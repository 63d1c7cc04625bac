{{/*
The operator's RBAC rules: fedtune.k8s.permissions.PERMISSIONS written out (why each verb is
needed is documented there). tests/test_helm_chart.py fails when these differ from the table;
tests/test_operator_rbac.py when the operator, bound by them on a real kube-apiserver, requests
anything the table lacks or is refused anything.
*/}}

{{/* Rules on cluster-scoped resources: always in the ClusterRole. Read-only. */}}
{{- define "fedtune-operator.clusterRules" -}}
- apiGroups: [""]
  resources: [nodes]
  verbs: [list]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}

{{/* Rules on namespaced resources: in the ClusterRole (clusterWide) or a Role per namespace. */}}
{{- define "fedtune-operator.namespacedRules" -}}
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [secrets]
  # update: never requested; RBAC escalation prevention requires it to create the pods' mailbox Roles.
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, list, create, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, create, delete]
- apiGroups: [fedtune.io]
  resources: [federatedjobs, parties]
  verbs: [get, list, watch, patch]
- apiGroups: [fedtune.io]
  resources: [federatedjobs/status, parties/status]
  verbs: [patch]
{{- end }}
