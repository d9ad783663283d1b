{{/*
Cross-field checks that values.schema.json cannot express. Each failure names the value and the
reason, like the deployment spec's own errors, so a bad combination stops at `helm install`
instead of as a placement group that never schedules.
*/}}

{{- define "moecluster.validate" -}}
{{- $v := .Values }}

{{- /* the checkpoint volume */}}
{{- if and $v.model.volume.existingClaim $v.model.volume.create.enabled }}
{{- fail "model.volume: set either existingClaim or create.enabled, not both" }}
{{- end }}
{{- if not (or $v.model.volume.existingClaim $v.model.volume.create.enabled) }}
{{- fail "model.volume: the checkpoint needs a volume: set model.volume.existingClaim to a PVC, or model.volume.create.enabled=true" }}
{{- end }}
{{- if $v.model.download.enabled }}
{{- if not (or $v.model.download.repo $v.model.download.command) }}
{{- fail "model.download: enabled, but neither model.download.repo nor model.download.command says what to download" }}
{{- end }}
{{- if and $v.model.volume.create.enabled (not (has "ReadWriteMany" $v.model.volume.create.accessModes)) }}
{{- fail (printf "model.volume.create.accessModes: %v lacks ReadWriteMany, which model.download.enabled needs (the head pod writes the checkpoint, the GPU pods on other nodes read it)" $v.model.volume.create.accessModes) }}
{{- end }}
{{- end }}

{{- /* the pools */}}
{{- include "moecluster.validatePool" (list "decode" $v.decode) }}
{{- if $v.prefill.enabled }}
{{- include "moecluster.validatePool" (list "prefill" $v.prefill) }}
{{- end }}

{{- /* the router */}}
{{- $r := $v.router }}
{{- $ports := list (int $r.grpcPort) (int $r.httpPort) (int $r.metricsPort) }}
{{- if ne (len (uniq $ports)) 3 }}
{{- fail (printf "router.httpPort: router.grpcPort, router.httpPort and router.metricsPort must differ, got %v" $ports) }}
{{- end }}
{{- range $name, $port := dict "router.grpcPort" (int $r.grpcPort) "router.httpPort" (int $r.httpPort) "router.metricsPort" (int $r.metricsPort) }}
{{- if has $port (list 6379 10001 52365 (int $v.ray.dashboardPort) (int $v.ray.metricsExportPort)) }}
{{- fail (printf "%s: %d is taken by Ray on the head pod (6379 GCS, 10001 client, 52365 dashboard agent, ray.dashboardPort, ray.metricsExportPort)" $name $port) }}
{{- end }}
{{- end }}
{{- if eq (int $v.ray.dashboardPort) (int $v.ray.metricsExportPort) }}
{{- fail (printf "ray.metricsExportPort: %d is also ray.dashboardPort; the two must differ" (int $v.ray.metricsExportPort)) }}
{{- end }}
{{- range $name, $port := dict "ray.dashboardPort" (int $v.ray.dashboardPort) "ray.metricsExportPort" (int $v.ray.metricsExportPort) }}
{{- if has $port (list 6379 10001 52365) }}
{{- fail (printf "%s: %d is taken by Ray itself (6379 GCS, 10001 client, 52365 dashboard agent)" $name $port) }}
{{- end }}
{{- end }}

{{- /* autoscaling */}}
{{- if and $v.autoscaling.enabled (not $v.autoscaling.enableInTreeAutoscaling) }}
{{- $grow := false }}
{{- range $pool := list $v.decode (ternary $v.prefill dict $v.prefill.enabled) }}
{{- if $pool }}
{{- $b := include "moecluster.bounds" $pool | fromJson }}
{{- if gt (int $b.max) (int $b.replicas) }}{{ $grow = true }}{{ end }}
{{- end }}
{{- end }}
{{- if $grow }}
{{- fail "autoscaling.enableInTreeAutoscaling: moecluster's autoscaler may grow a pool beyond its starting replicas (maxReplicas > replicas), but without KubeRay's in-tree autoscaler no pods would be added for the new replicas; set autoscaling.enableInTreeAutoscaling=true or maxReplicas = replicas" }}
{{- end }}
{{- end }}
{{- end }}

{{/* One pool: (list name values). */}}
{{- define "moecluster.validatePool" -}}
{{- $name := index . 0 }}
{{- $p := index . 1 }}
{{- $ep := int $p.ep }}
{{- $gpp := int $p.gpusPerPod }}
{{- if lt (int $p.replicas) 1 }}
{{- fail (printf "%s.replicas: must be at least 1, got %d" $name (int $p.replicas)) }}
{{- end }}
{{- if le $ep 8 }}
{{- if ne (mod $gpp $ep) 0 }}
{{- fail (printf "%s.ep: %d ranks per replica do not fit whole in pods of %s.gpusPerPod=%d GPUs; moecluster packs a replica of up to 8 ranks onto one Ray node, so gpusPerPod must be a multiple of ep" $name $ep $name $gpp) }}
{{- end }}
{{- else if ne (mod $ep $gpp) 0 }}
{{- fail (printf "%s.ep: %d is not a multiple of %s.gpusPerPod=%d; a replica of more than 8 ranks must span whole pods" $name $ep $name $gpp) }}
{{- end }}
{{- /* Every rank's placement-group bundle is {GPU: 1, CPU: 1}: Ray on the pod needs a CPU per GPU. */}}
{{- $cpus := 0 }}
{{- $cpuText := toString $p.resources.cpu }}
{{- $cpuKey := "resources.cpu" }}
{{- with $p.rayStartParams }}{{ with index . "num-cpus" }}{{ $cpuText = toString . }}{{ $cpuKey = "rayStartParams.num-cpus" }}{{ end }}{{ end }}
{{- if regexMatch "^[0-9]+(\\.[0-9]+)?m$" $cpuText }}
{{- $cpus = ceil (divf (float64 (trimSuffix "m" $cpuText)) 1000) }}
{{- else if regexMatch "^[0-9]+(\\.[0-9]+)?$" $cpuText }}
{{- $cpus = ceil (float64 $cpuText) }}
{{- else }}
{{- $cpus = $gpp }}{{- /* an unusual quantity (e.g. 1k): not checked */}}
{{- end }}
{{- if lt (int $cpus) $gpp }}
{{- fail (printf "%s.%s: %s gives Ray %d CPU(s) per pod, but each of the %s.gpusPerPod=%d ranks reserves 1 CPU with its GPU in the replica's placement group, which would never be scheduled; give at least %d" $name $cpuKey $cpuText (int $cpus) $name $gpp $gpp) }}
{{- end }}
{{- $b := include "moecluster.bounds" $p | fromJson }}
{{- range list (list "replicas" (int $b.replicas)) (list "minReplicas" (int $b.min)) (list "maxReplicas" (int $b.max)) }}
{{- $key := index . 0 }}
{{- $n := index . 1 }}
{{- if ne (mod (mul $n $ep) $gpp) 0 }}
{{- fail (printf "%s.%s: %d replicas x %s.ep=%d = %d GPUs is not a whole number of pods of %s.gpusPerPod=%d" $name $key $n $name $ep (mul $n $ep) $name $gpp) }}
{{- end }}
{{- end }}
{{- if gt (int $b.min) (int $b.replicas) }}
{{- fail (printf "%s.minReplicas: %d exceeds %s.replicas (%d)" $name (int $b.min) $name (int $b.replicas)) }}
{{- end }}
{{- if lt (int $b.max) (int $b.replicas) }}
{{- fail (printf "%s.maxReplicas: %d is below %s.replicas (%d)" $name (int $b.max) $name (int $b.replicas)) }}
{{- end }}
{{- if lt (int $b.max) 1 }}
{{- fail (printf "%s.maxReplicas: must be at least 1, got %d" $name (int $b.max)) }}
{{- end }}
{{- end }}
