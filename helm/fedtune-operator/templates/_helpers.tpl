{{/* Name of every object of the chart: one operator per cluster, so a fixed default. */}}
{{- define "fedtune-operator.fullname" -}}
{{- .Values.fullnameOverride | default "fedtune-operator" | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "fedtune-operator.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "fedtune-operator.fullname" .) -}}
{{- end }}

{{/* Labels the Deployment selects its pods by (immutable once installed). */}}
{{- define "fedtune-operator.selectorLabels" -}}
app.kubernetes.io/name: fedtune
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fedtune-operator.labels" -}}
{{ include "fedtune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: fedtune
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* Settings the chart refuses to render: contradictions a user can fix by reading the message. */}}
{{- define "fedtune-operator.validate" -}}
{{- if and (not .Values.rbac.clusterWide) (not .Values.watchNamespaces) }}
{{- fail "rbac.clusterWide=false needs watchNamespaces: the namespaces the operator serves (coordinator and party namespaces)" }}
{{- end }}
{{- if and .Values.rbac.clusterWide .Values.rbac.coordinatorNamespaces }}
{{- fail "rbac.coordinatorNamespaces only applies with rbac.clusterWide=false (the ClusterRole already covers every namespace)" }}
{{- end }}
{{- range .Values.rbac.coordinatorNamespaces }}
{{- if not (has . $.Values.watchNamespaces) }}
{{- fail (printf "rbac.coordinatorNamespaces: %s is not in watchNamespaces; the operator would hold rights there but never serve it" .) }}
{{- end }}
{{- end }}
{{- with .Values.leaderElection }}
{{- if and (gt (int $.Values.replicaCount) 1) (not .enabled) }}
{{- fail "replicaCount above 1 needs leaderElection.enabled: without it every replica would reconcile every job" }}
{{- end }}
{{- if ge (int .renewDeadlineSeconds) (int .leaseDurationSeconds) }}
{{- fail "leaderElection.renewDeadlineSeconds must be below leaseDurationSeconds (a leader must give up before a standby takes over)" }}
{{- end }}
{{- if le (float64 .renewDeadlineSeconds) (mulf 1.2 .retryPeriodSeconds) }}
{{- fail "leaderElection.renewDeadlineSeconds must be above 1.2 x retryPeriodSeconds (room for more than one renewal try)" }}
{{- end }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "serviceMonitor.enabled needs metrics.enabled (there is nothing to scrape)" }}
{{- end }}
{{- end }}
