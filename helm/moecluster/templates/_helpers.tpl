{{/* Names, labels and small shared pieces. */}}

{{- define "moecluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name is also the RayCluster's name. KubeRay derives pod names
(<cluster>-<group>-worker-xxxxx) and its head Service (<cluster>-head-svc) from it, hence 40.
*/}}
{{- define "moecluster.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moecluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moecluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moecluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moecluster.labels" -}}
helm.sh/chart: {{ include "moecluster.chart" . }}
{{ include "moecluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* KubeRay's labels on the head pod of this release's RayCluster. */}}
{{- define "moecluster.headSelector" -}}
ray.io/cluster: {{ include "moecluster.fullname" . }}
ray.io/node-type: head
{{- end }}

{{- define "moecluster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moecluster.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "moecluster.image" -}}
{{- $repo := required "image.repository: set the moecluster image" .Values.image.repository }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{- define "moecluster.downloadImage" -}}
{{- $d := .Values.model.download.image }}
{{- if $d.repository }}
{{- printf "%s:%s" $d.repository (default (default .Chart.AppVersion .Values.image.tag) $d.tag | toString) }}
{{- else }}
{{- include "moecluster.image" . }}
{{- end }}
{{- end }}

{{- define "moecluster.modelClaim" -}}
{{- if .Values.model.volume.existingClaim }}
{{- .Values.model.volume.existingClaim }}
{{- else }}
{{- printf "%s-model" (include "moecluster.fullname" .) }}
{{- end }}
{{- end }}

{{- define "moecluster.specConfigMap" -}}
{{- printf "%s-spec" (include "moecluster.fullname" .) }}
{{- end }}

{{/* Where the spec ConfigMap is mounted; the head's command reads SPEC_DIR/spec.yaml. */}}
{{- define "moecluster.specDir" -}}/etc/moecluster{{- end }}
{{/* Not under specDir: a volume mounted inside a ConfigMap volume fails on read-only mounts. */}}
{{- define "moecluster.tlsDir" -}}/etc/moecluster-tls{{- end }}

{{/* Replica bounds of a pool: {"replicas", "min", "max"} as integers, min/max defaulting to replicas. */}}
{{- define "moecluster.bounds" -}}
{{- $p := . }}
{{- $n := int $p.replicas }}
{{- $min := $n }}
{{- if not (kindIs "invalid" $p.minReplicas) }}{{ $min = int $p.minReplicas }}{{ end }}
{{- $max := $n }}
{{- if not (kindIs "invalid" $p.maxReplicas) }}{{ $max = int $p.maxReplicas }}{{ end }}
{{- dict "replicas" $n "min" $min "max" $max | toJson }}
{{- end }}

{{/* Pods holding `n` replicas of a pool: n x ep / gpusPerPod (validated to divide). */}}
{{- define "moecluster.pods" -}}
{{- $p := index . 0 }}
{{- $n := int (index . 1) }}
{{- div (mul $n (int $p.ep)) (int $p.gpusPerPod) }}
{{- end }}

{{/* requests = limits: the cpu/memory of a `resources` value, the GPUs, and its extras. */}}
{{- define "moecluster.resources" -}}
{{- $r := index . 0 }}
{{- $gpus := index . 1 }}
{{- $q := dict "cpu" ($r.cpu | toString) "memory" ($r.memory | toString) }}
{{- if $gpus }}{{ $_ := set $q "nvidia.com/gpu" ($gpus | toString) }}{{ end }}
{{- range $k, $v := ($r.extra | default dict) }}{{ $_ := set $q $k ($v | toString) }}{{ end }}
requests:
  {{- toYaml $q | nindent 2 }}
limits:
  {{- toYaml $q | nindent 2 }}
{{- end }}

{{- define "moecluster.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* The env entries that every Ray container carries. */}}
{{- define "moecluster.rayEnv" -}}
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end }}
