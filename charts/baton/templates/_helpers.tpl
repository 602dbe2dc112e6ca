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

{{/* The agents' namespace: the release namespace, or agent.namespace. */}}
{{- define "baton.agent.namespace" -}}{{ .Values.agent.namespace | default .Release.Namespace }}{{- end -}}

{{- define "baton.tag" -}}{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}

{{/* An image reference, (list . "operator"|"agent"): pinned by digest when one is set. */}}
{{- define "baton.image" -}}
{{- $root := index . 0 -}}
{{- $which := index . 1 -}}
{{- $repository := ternary $root.Values.image.operatorRepository $root.Values.image.agentRepository (eq $which "operator") -}}
{{- $digest := index $root.Values.image.digest $which -}}
{{- if $digest -}}
"{{ $repository }}@{{ $digest }}"
{{- else -}}
"{{ $repository }}:{{ include "baton.tag" $root }}"
{{- end -}}
{{- end -}}

{{/* The operator's ServiceAccount username, as admission sees it. */}}
{{- define "baton.operator.username" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "baton.operator.fullname" . }}
{{- end -}}

{{/* The agent's ServiceAccount username, as admission sees it. */}}
{{- define "baton.agent.username" -}}
system:serviceaccount:{{ include "baton.agent.namespace" . }}:{{ include "baton.agent.fullname" . }}
{{- end -}}
