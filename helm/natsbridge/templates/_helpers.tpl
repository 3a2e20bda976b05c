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
{{- printf "%s://%s.%s.svc.%s:%d" $scheme (include "natsbridge.nats.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.nats.ports.client) }}
{{- else }}
{{- required "nats.externalUrl is required when nats.enabled is false" .Values.nats.externalUrl }}
{{- end }}
{{- end }}

{{- define "natsbridge.nats.clusterName" -}}
{{- default (include "natsbridge.nats.fullname" .) .Values.nats.clusterName }}
{{- end }}

{{/* Bytes of a Kubernetes memory quantity (no suffix, k, Ki, M, Mi, G, Gi, T, Ti). */}}
{{- define "natsbridge.bytes" -}}
{{- $q := toString . }}
{{- $digits := regexFind "^[0-9]+" $q }}
{{- $unit := trimPrefix $digits $q }}
{{- $mult := dict "" 1 "k" 1000 "Ki" 1024 "M" 1000000 "Mi" 1048576 "G" 1000000000 "Gi" 1073741824 "T" 1000000000000 "Ti" 1099511627776 }}
{{- if or (not $digits) (not (hasKey $mult $unit)) }}
{{- fail (printf "%q is not a memory quantity this chart understands (digits and one of k Ki M Mi G Gi T Ti)" $q) }}
{{- end }}
{{- mul (int64 $digits) (int64 (get $mult $unit)) }}
{{- end }}

{{/* GOMEMLIMIT of the NATS container: 80% of its memory limit, in bytes. */}}
{{- define "natsbridge.nats.goMemLimit" -}}
{{- div (mul (int64 (include "natsbridge.bytes" .Values.nats.resources.limits.memory)) 80) 100 }}
{{- end }}

{{/* JetStream's max_memory_store in bytes: the value, or half the memory limit. */}}
{{- define "natsbridge.nats.maxMemoryStore" -}}
{{- $v := .Values.nats.jetstream.maxMemoryStore }}
{{- $limit := int64 (include "natsbridge.bytes" .Values.nats.resources.limits.memory) }}
{{- $store := ternary (div $limit 2) (int64 (include "natsbridge.bytes" (default 0 $v))) (or (not $v) (eq (toString $v) "0")) }}
{{- if ge $store (int64 (include "natsbridge.nats.goMemLimit" .)) }}
{{- fail (printf "nats.jetstream.maxMemoryStore (%v) must stay below GOMEMLIMIT, 80%% of nats.resources.limits.memory (%s)" $v .Values.nats.resources.limits.memory) }}
{{- end }}
{{- $store }}
{{- end }}

{{/* The NATS user of the provisioning Job (a service may not take this name). */}}
{{- define "natsbridge.nats.provisionUser" -}}natsbridge-provision{{- end }}

{{/* Every NATS user the chart configures, as a JSON list: the services', then provisioning's. */}}
{{- define "natsbridge.nats.userNames" -}}
{{- $names := keys .Values.nats.auth.users | sortAlpha }}
{{- append $names (include "natsbridge.nats.provisionUser" .) | toJson }}
{{- end }}

{{/* The environment variable nats-server reads a user's password from: NATS_PASSWORD_<USER>. */}}
{{- define "natsbridge.nats.passwordEnv" -}}
{{- printf "NATS_PASSWORD_%s" (regexReplaceAll "[^A-Za-z0-9]" . "_" | upper) }}
{{- end }}

{{/* The Secret holding every user's password (key = user name). */}}
{{- define "natsbridge.nats.usersSecret" -}}
{{- default (printf "%s-users" (include "natsbridge.nats.fullname" .)) .Values.nats.auth.existingSecret }}
{{- end }}

{{/*
Generated passwords, user -> password, as JSON. Computed once per render and cached, because
the servers' Secret and the sidecars' URL Secrets must hold the same ones; an existing Secret
(upgrade) keeps its passwords, so upgrades do not rotate them. A generated password starts
with a letter: nats-server reads the unquoted `password: $NATS_PASSWORD_X` as a config value,
so one starting with a digit (`1e5…`, `4kb…`, `7.2…`, all digits) is a number or a size and
the server refuses to start.
*/}}
{{- define "natsbridge.nats.passwords" -}}
{{- if not (hasKey .Values "__natsbridgePasswords") }}
{{- $old := (lookup "v1" "Secret" .Release.Namespace (include "natsbridge.nats.usersSecret" .)).data | default dict }}
{{- $pw := dict }}
{{- range $u := include "natsbridge.nats.userNames" . | fromJsonArray }}
{{- $_ := set $pw $u (ternary (index $old $u | default "" | b64dec) (printf "%s%s" (randAlpha 1) (randAlphaNum 39)) (hasKey $old $u)) }}
{{- end }}
{{- $_ := set .Values "__natsbridgePasswords" $pw }}
{{- end }}
{{- index .Values "__natsbridgePasswords" | toJson }}
{{- end }}

{{/* The NATS service a routes entry runs as: its routes file's [sidecar] service. */}}
{{- define "natsbridge.routes.service" -}}
{{- $doc := fromToml .toml }}
{{- if hasKey $doc "Error" }}
{{- fail (printf "routes[%s].toml does not parse: %s" .name $doc.Error) }}
{{- end }}
{{- (get (default dict $doc.sidecar) "service") | default "" }}
{{- end }}

{{/* A nats.conf permission list: an empty allow-list would allow everything, so it denies all. */}}
{{- define "natsbridge.nats.allow" -}}
{{- /* quote, not toJson: JSON escapes ">" as \u003e, which nats.conf does not read. */}}
{{- if . }}{ allow: [{{ range $i, $s := . }}{{ if $i }}, {{ end }}{{ $s | quote }}{{ end }}] }{{ else }}{ deny: [">"] }{{ end }}
{{- end }}
