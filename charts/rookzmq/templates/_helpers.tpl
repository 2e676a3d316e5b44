{{/* Common names and labels. */}}
{{- define "rookzmq.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rookzmq.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "rookzmq.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Env that points in-cluster clients at kubernetesAPI, when set. */}}
{{- define "rookzmq.apiEnv" -}}
{{- if .Values.kubernetesAPI.host }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.kubernetesAPI.host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.kubernetesAPI.port | default "443" | quote }}
{{- end }}
{{- end -}}

{{- define "rookzmq.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end -}}
