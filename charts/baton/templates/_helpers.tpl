{{/* Names and labels shared by every template. */}}
{{- define "baton.name" -}}baton{{- end -}}

{{- define "baton.labels" -}}
app.kubernetes.io/name: baton
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "baton.operator.selector" -}}
app.kubernetes.io/name: baton
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "baton.agent.selector" -}}
app.kubernetes.io/name: baton
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "baton.operator.fullname" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "baton.agent.fullname" -}}{{ .Release.Name }}-agent{{- end -}}

{{- define "baton.tag" -}}{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}

{{/* The agent's ServiceAccount username, as admission sees it. */}}
{{- define "baton.agent.username" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "baton.agent.fullname" . }}
{{- end -}}
