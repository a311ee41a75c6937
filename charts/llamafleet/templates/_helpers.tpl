{{- define "llamafleet.name" -}}
{{- default "llamafleet" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llamafleet.fullname" -}}
{{- if .Values.fullnameOverride -}}{{ .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else -}}
{{- $name := include "llamafleet.name" . -}}
{{- if contains $name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llamafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llamafleet.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llamafleet.labels" -}}
{{ include "llamafleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llamafleet
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llamafleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "llamafleet.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "llamafleet.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{- define "llamafleet.gpuImageTag" -}}
{{ default (printf "%s-cuda" .Chart.AppVersion) .Values.gpuImage.tag }}
{{- end -}}
