{{/* Names and labels shared by every template. */}}

{{- define "g2rpo.operatorName" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Secret holding the key the jobs' controller tokens are derived from (G2RPO_TOKEN_KEY_SECRET). */}}
{{- define "g2rpo.tokenKeySecret" -}}
{{- printf "%s-token-key" (include "g2rpo.operatorName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "g2rpo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "g2rpo.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator pods' selector: immutable, so only names that never change with an upgrade. */}}
{{- define "g2rpo.selectorLabels" -}}
app.kubernetes.io/name: g2rpo
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "g2rpo.labels" -}}
{{ include "g2rpo.selectorLabels" . }}
app.kubernetes.io/part-of: g2rpo
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels of the monitoring objects: the chart's, plus monitoring.labels (a Prometheus' selector). */}}
{{- define "g2rpo.monitoringLabels" -}}
{{ include "g2rpo.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "g2rpo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "g2rpo.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) -}}
{{- end -}}

{{/* The operator's API permissions: the one list in files/rbac/, pasted verbatim (comments kept).
The argument is the peering mode: "clusterwide" or "namespaced". */}}
{{- define "g2rpo.rbacRules" -}}
{{ .root.Files.Get "files/rbac/operator-rules.yaml" }}
{{- .root.Files.Get (printf "files/rbac/peering-%s.yaml" .peering) }}
{{- if .root.Values.kueue.enabled }}
{{- .root.Files.Get "files/rbac/kueue-rules.yaml" }}
{{- if eq .peering "clusterwide" }}
{{- .root.Files.Get "files/rbac/kueue-cluster.yaml" }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The monitors scrape the controllers where jobs run: the watched namespaces, or all of them. */}}
{{- define "g2rpo.jobNamespaceSelector" -}}
{{- if .Values.watchNamespaces }}
matchNames:
{{- toYaml .Values.watchNamespaces | nindent 2 }}
{{- else }}
any: true
{{- end }}
{{- end -}}

{{- define "g2rpo.checkMonitoring" -}}
{{- if and .Values.monitoring.serviceMonitor.enabled .Values.monitoring.podMonitor.enabled -}}
{{- fail "monitoring.serviceMonitor.enabled and monitoring.podMonitor.enabled are both true: enable one of them (each scrapes the same endpoints; both would scrape every job twice)" -}}
{{- end -}}
{{- end -}}

{{/* Non-empty when a ServiceMonitor or PodMonitor scrapes the jobs' vLLM rollouts. */}}
{{- define "g2rpo.scrapeRollout" -}}
{{- if and .Values.monitoring.rollout.enabled (or .Values.monitoring.serviceMonitor.enabled .Values.monitoring.podMonitor.enabled) -}}
true
{{- end -}}
{{- end -}}

{{/* vLLM's metrics carry no job name: copy the pod's instance label (the G2RPOJob's name) into
g2rpo_job, the label every dashboard query filters on. And prometheus_client 0.26 (vLLM's) writes
`vllm:x` samples as `vllm_x` when a Prometheus 2 negotiates OpenMetrics without `escaping=allow-utf-8`
(prometheus/client_python#1177): the second rule renames them back, a no-op where the colon arrives. */}}
{{- define "g2rpo.rolloutRelabelings" -}}
relabelings:
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_instance]
  targetLabel: g2rpo_job
  action: replace
metricRelabelings:
- sourceLabels: [__name__]
  regex: vllm_(.+)
  targetLabel: __name__
  replacement: vllm:$1
  action: replace
{{- end -}}
