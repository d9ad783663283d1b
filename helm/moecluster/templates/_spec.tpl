{{/*
The deployment spec (cluster/spec.py DeploymentSpec) built from values, as a dict: rendered with
toYaml into the ConfigMap that `moecluster serve --spec` reads on the head. Unset (null) values
are left out so the spec's own defaults apply.
*/}}

{{- define "moecluster.pool" -}}
{{- dict "replicas" (int .replicas) "ep" (int .ep) "device" "cuda" | toJson }}
{{- end }}

{{- define "moecluster.compact" -}}
{{- $out := dict }}
{{- range $k, $v := . }}{{ if not (kindIs "invalid" $v) }}{{ $_ := set $out $k $v }}{{ end }}{{ end }}
{{- toJson $out }}
{{- end }}

{{- define "moecluster.spec" -}}
{{- $v := .Values }}
{{- $spec := dict "model" $v.model.path "trust_remote_code" $v.model.trustRemoteCode }}
{{- with $v.model.servedName }}{{ $_ := set $spec "served_name" . }}{{ end }}
{{- $_ := set $spec "decode" (include "moecluster.pool" $v.decode | fromJson) }}
{{- if $v.prefill.enabled }}
{{- $_ := set $spec "prefill" (include "moecluster.pool" $v.prefill | fromJson) }}
{{- end }}
{{- $c := $v.cache }}
{{- $_ := set $spec "cache" (include "moecluster.compact" (dict
      "block_size" (int $c.blockSize)
      "memory_fraction" $c.memoryFraction
      "num_blocks" (ternary nil (int $c.numBlocks) (kindIs "invalid" $c.numBlocks))
      "enable_prefix_caching" $c.enablePrefixCaching) | fromJson) }}
{{- $e := $v.engine }}
{{- $_ := set $spec "engine" (include "moecluster.compact" (dict
      "dtype" $e.dtype
      "max_model_len" (ternary nil (int $e.maxModelLen) (kindIs "invalid" $e.maxModelLen))
      "max_num_seqs" (int $e.maxNumSeqs)
      "max_num_batched_tokens" (ternary nil (int $e.maxNumBatchedTokens) (kindIs "invalid" $e.maxNumBatchedTokens))
      "enable_chunked_prefill" $e.enableChunkedPrefill
      "eplb_redundant_slots" (int $e.eplbRedundantSlots)
      "eplb_interval_steps" (ternary nil (int $e.eplbIntervalSteps) (kindIs "invalid" $e.eplbIntervalSteps))
      "kv_transfer" $e.kvTransfer
      "cuda_graph_max_batch" (int $e.cudaGraphMaxBatch)
      "async_scheduling" $e.asyncScheduling
      "decode_experts_w8a8" $e.decodeExpertsW8a8
      "decode_linears_w8a8" $e.decodeLinearsW8a8) | fromJson) }}
{{- $r := $v.router }}
{{- $router := dict "host" "0.0.0.0" "grpc_port" (int $r.grpcPort) "http_port" (int $r.httpPort)
      "metrics_port" (int $r.metricsPort) "policy" $r.policy "max_queue" (int $r.maxQueue) }}
{{- if $r.apiKey.secretName }}{{ $_ := set $router "api_key_env" $r.apiKey.env }}{{ end }}
{{- if $r.tls.secretName }}
{{- $_ := set $router "tls_cert" (printf "%s/tls.crt" (include "moecluster.tlsDir" .)) }}
{{- $_ := set $router "tls_key" (printf "%s/tls.key" (include "moecluster.tlsDir" .)) }}
{{- end }}
{{- $_ := set $spec "router" $router }}
{{- $a := $v.autoscaling }}
{{- if $a.enabled }}
{{- $auto := dict "policy" $a.policy "interval_s" $a.intervalSeconds "cooldown_s" $a.cooldownSeconds }}
{{- $b := include "moecluster.bounds" $v.decode | fromJson }}
{{- $_ := set $auto "decode" (dict "min_replicas" (int $b.min) "max_replicas" (int $b.max)) }}
{{- if $v.prefill.enabled }}
{{- $b := include "moecluster.bounds" $v.prefill | fromJson }}
{{- $_ := set $auto "prefill" (dict "min_replicas" (int $b.min) "max_replicas" (int $b.max)) }}
{{- end }}
{{- $_ := set $spec "autoscaling" $auto }}
{{- end }}
{{- toYaml $spec }}
{{- end }}
