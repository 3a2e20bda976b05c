{{/* Names, labels and the values every template shares. */}}

{{- define "natsbridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "natsbridge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "natsbridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object; pass (dict "ctx" $ "component" "nats"). */}}
{{- define "natsbridge.labels" -}}
helm.sh/chart: {{ include "natsbridge.chart" .ctx }}
{{ include "natsbridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: natsbridge
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "natsbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "natsbridge.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "natsbridge.nats.fullname" -}}
{{- printf "%s-nats" (include "natsbridge.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "natsbridge.nats.headless" -}}
{{- printf "%s-nats-headless" (include "natsbridge.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "natsbridge.injector.fullname" -}}
{{- printf "%s-injector" (include "natsbridge.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "natsbridge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The NATS URL sidecars and the provisioning Job connect to. */}}
{{- define "natsbridge.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- $scheme := ternary "tls" "nats" .Values.nats.tls.enabled }}
{{- printf "%s://%s.%s.svc.cluster.local:%d" $scheme (include "natsbridge.nats.fullname" .) .Release.Namespace (int .Values.nats.ports.client) }}
{{- else }}
{{- required "nats.externalUrl is required when nats.enabled is false" .Values.nats.externalUrl }}
{{- end }}
{{- end }}

{{- define "natsbridge.nats.clusterName" -}}
{{- default (include "natsbridge.nats.fullname" .) .Values.nats.clusterName }}
{{- end }}
