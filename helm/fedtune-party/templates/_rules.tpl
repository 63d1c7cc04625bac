{{/*
What the operator needs in a namespace it serves: the namespaced rows of
fedtune.k8s.permissions.PERMISSIONS (same as fedtune-operator's "namespacedRules"; why each verb
is needed is documented there). tests/test_helm_chart.py fails when they differ.
*/}}
{{- define "fedtune-party.operatorRules" -}}
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
