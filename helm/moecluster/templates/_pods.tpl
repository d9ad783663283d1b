{{/* Pod pieces shared by the head and the worker groups of the RayCluster. */}}

{{- define "moecluster.podCommon" -}}
serviceAccountName: {{ include "moecluster.serviceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "moecluster.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* /dev/shm in memory: NCCL's intra-node buffers and Ray's object store live there. */}}
{{- define "moecluster.shmVolume" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . | toString }}
{{- end }}

{{- define "moecluster.modelVolume" -}}
{{- $ctx := index . 0 }}
{{- $readOnly := index . 1 }}
- name: model
  persistentVolumeClaim:
    claimName: {{ include "moecluster.modelClaim" $ctx }}
    readOnly: {{ $readOnly }}
{{- end }}

{{- define "moecluster.modelMount" -}}
{{- $ctx := index . 0 }}
{{- $readOnly := index . 1 }}
- name: model
  mountPath: {{ $ctx.Values.model.path }}
  readOnly: {{ $readOnly }}
  {{- with $ctx.Values.model.volume.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}

{{/* An init container of the head pod that fills the model volume (skipped once complete). */}}
{{- define "moecluster.downloadContainer" -}}
{{- $d := .Values.model.download }}
- name: download-model
  image: {{ include "moecluster.downloadImage" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if $d.command }}
  command:
    {{- toYaml $d.command | nindent 4 }}
  {{- else }}
  command: ["/bin/bash", "-c", "--"]
  args:
    - |
      set -eu
      # Done once per repository and revision: the marker names what the volume holds.
      marker="$MODEL_PATH/.moecluster-download-complete"
      if [ "$(cat "$marker" 2>/dev/null)" = "$HF_REPO@$HF_REVISION" ]; then
        echo "$HF_REPO@$HF_REVISION is already in $MODEL_PATH"; exit 0
      fi
      huggingface-cli download "$HF_REPO" --revision "$HF_REVISION" --local-dir "$MODEL_PATH"
      echo "$HF_REPO@$HF_REVISION" > "$marker"
  {{- end }}
  env:
    - name: MODEL_PATH
      value: {{ .Values.model.path | quote }}
    - name: HF_REPO
      value: {{ $d.repo | quote }}
    - name: HF_REVISION
      value: {{ $d.revision | quote }}
    - name: HF_HOME
      value: /tmp/huggingface
    {{- if $d.hfToken.secretName }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $d.hfToken.secretName }}
          key: {{ $d.hfToken.secretKey }}
    {{- end }}
  resources:
    {{- include "moecluster.resources" (list $d.resources 0) | trim | nindent 4 }}
  securityContext:
    {{- include "moecluster.containerSecurityContext" . | trim | nindent 4 }}
  volumeMounts:
    {{- include "moecluster.modelMount" (list . false) | trim | nindent 4 }}
{{- end }}

{{/*
KubeRay injects liveness and readiness probes into Ray containers that define none, but they query
the dashboard agent on 52365 and (head) the dashboard on 8265 whatever the rayStartParams say: with
other ports they fail, and the liveness probe restarts the pod forever. Then the chart writes the
same checks against the configured ports: (list $probeValue "liveness"|"readiness" isHead agentPort dashboardPort).
*/}}
{{- define "moecluster.rayProbe" -}}
{{- $given := index . 0 }}
{{- $kind := index . 1 }}
{{- $head := index . 2 }}
{{- $agent := int (index . 3) }}
{{- $dash := int (index . 4) }}
{{- if $given }}
{{ $kind }}Probe:
  {{- toYaml $given | nindent 2 }}
{{- else if or (ne $agent 52365) (and $head (ne $dash 8265)) }}
{{- $cmd := printf "wget --tries 1 -T 2 -q -O- http://localhost:%d/api/local_raylet_healthz | grep success" $agent }}
{{- if $head }}
{{- $cmd = printf "%s && wget --tries 1 -T 2 -q -O- http://localhost:%d/api/gcs_healthz | grep success" $cmd $dash }}
{{- end }}
{{ $kind }}Probe:
  exec:
    command: ["bash", "-c", {{ $cmd | quote }}]
  {{- if eq $kind "liveness" }}
  initialDelaySeconds: 30
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 120
  {{- else }}
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 10
  {{- end }}
{{- end }}
{{- end }}

{{/* One worker group: (list $ "decode" .Values.decode). */}}
{{- define "moecluster.workerGroup" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $p := index . 2 }}
{{- $b := include "moecluster.bounds" $p | fromJson }}
- groupName: {{ $name }}
  replicas: {{ include "moecluster.pods" (list $p $b.replicas) }}
  minReplicas: {{ include "moecluster.pods" (list $p $b.min) }}
  maxReplicas: {{ include "moecluster.pods" (list $p $b.max) }}
  numOfHosts: 1
  rayStartParams:
    {{- $params := dict "num-gpus" (int $p.gpusPerPod | toString) "metrics-export-port" (int $root.Values.ray.metricsExportPort | toString) }}
    {{- range $k, $v := $p.rayStartParams }}{{ $_ := set $params $k ($v | toString) }}{{ end }}
    {{- toYaml $params | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "moecluster.labels" $root | trim | nindent 8 }}
        app.kubernetes.io/component: {{ $name }}
        {{- with $p.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $p.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "moecluster.podCommon" $root | trim | nindent 6 }}
      automountServiceAccountToken: false
      {{- with (include "moecluster.scheduling" $p | trim) }}{{ . | nindent 6 }}{{ end }}
      containers:
        - name: ray-worker
          image: {{ include "moecluster.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          # KubeRay puts its generated `ray start --address=... --block` in KUBERAY_GEN_RAY_START_CMD
          # (annotation ray.io/overwrite-container-cmd on the RayCluster).
          command: ["/bin/bash", "-lc", "--"]
          args:
            - |
              ulimit -n 65536 || true
              eval "$KUBERAY_GEN_RAY_START_CMD"
          {{- $env := concat ($root.Values.ray.env | default list) ($p.env | default list) }}
          {{- with $env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: metrics
              containerPort: {{ int $root.Values.ray.metricsExportPort }}
              protocol: TCP
          {{- $agent := index $params "dashboard-agent-listen-port" | default "52365" }}
          {{- range $kind := list "liveness" "readiness" }}
          {{- with (include "moecluster.rayProbe" (list nil $kind false $agent 8265) | trim) }}{{ . | nindent 10 }}{{ end }}
          {{- end }}
          # `ray stop` before SIGTERM: bash (PID 1) would not pass the signal on to `ray start --block`,
          # so the node would leave Ray only when killed at the end of the grace period.
          lifecycle:
            preStop:
              exec:
                command: ["/bin/bash", "-lc", "ray stop || true"]
          resources:
            {{- include "moecluster.resources" (list $p.resources (int $p.gpusPerPod)) | trim | nindent 12 }}
          securityContext:
            {{- include "moecluster.containerSecurityContext" $root | trim | nindent 12 }}
          volumeMounts:
            - name: shm
              mountPath: /dev/shm
            {{- include "moecluster.modelMount" (list $root true) | trim | nindent 12 }}
      volumes:
        {{- include "moecluster.shmVolume" $p.shmSize | trim | nindent 8 }}
        {{- include "moecluster.modelVolume" (list $root true) | trim | nindent 8 }}
{{- end }}
