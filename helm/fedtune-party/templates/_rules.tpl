{{/*
What the operator needs in a party's namespace: fedtune.k8s.permissions.party_rows(), the
namespaced rows of PERMISSIONS (fedtune-operator's "namespacedRules") but for FederatedJobs, which
live in coordinator namespaces: here the operator only watches them, and never writes a job's
status. Why each verb is needed is documented there. tests/test_helm_chart.py fails when they
differ. Whoever installs this chart must hold every verb granted here (escalation prevention).
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
  resources: [parties]
  verbs: [get, list, watch, patch]
- apiGroups: [fedtune.io]
  resources: [parties/status]
  verbs: [patch]
- apiGroups: [fedtune.io]
  # kopf watches FederatedJobs in every namespace the operator serves; none runs here.
  resources: [federatedjobs]
  verbs: [list, watch]
{{- end }}
