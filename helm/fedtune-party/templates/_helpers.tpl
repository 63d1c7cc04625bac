{{/* The Party's name, which FederatedJobs reference; also the prefix of this chart's objects. */}}
{{- define "fedtune-party.name" -}}
{{- .Values.name | default .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "fedtune-party.labels" -}}
app.kubernetes.io/name: fedtune-party
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: fedtune
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}
