{{/* Names and labels. */}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The image of one component: its own image values over the global ones. */}}
{{- define "pdserve.image" -}}
{{- $img := merge (deepCopy (.own | default dict)) .root.Values.image -}}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* The Ray custom resource that pins a pool's actors to that pool's pods. */}}
{{- define "pdserve.rayResource" -}}
pdserve_{{ . }}
{{- end -}}

{{/* minReplicas <= replicas <= maxReplicas, checked here because a JSON schema cannot compare keys. */}}
{{- define "pdserve.checkPool" -}}
{{- $p := index .Values .role -}}
{{- if or (lt (int $p.replicas) (int $p.minReplicas)) (gt (int $p.replicas) (int $p.maxReplicas)) -}}
{{- fail (printf "%s.replicas=%d must lie within %s.minReplicas..%s.maxReplicas (%d..%d)" .role (int $p.replicas) .role .role (int $p.minReplicas) (int $p.maxReplicas)) -}}
{{- end -}}
{{- end -}}

{{/* One pool's section of the pdserve config. */}}
{{- define "pdserve.poolConfig" -}}
{{- $p := index .Values .role -}}
{{- $engine := dict -}}
{{- range $k, $v := $p.engine -}}
{{- $_ := set $engine (snakecase $k) $v -}}
{{- end -}}
replicas: {{ int $p.replicas }}
precision: {{ $p.precision | toJson }}
num_gpus: {{ $p.gpus | toJson }}
num_cpus: {{ $p.numCpus | toJson }}
resources: {{ dict (include "pdserve.rayResource" .role) 1 | toJson }}
engine: {{ $engine | toJson }}
{{- end -}}

{{/* The pdserve config (pdserve/config.py), rendered from the values: one source of truth. */}}
{{- define "pdserve.config" -}}
{{- $v := .Values -}}
model:
  path: {{ $v.model.path | toJson }}
  dtype: {{ $v.model.dtype | toJson }}
  max_model_len: {{ $v.model.maxModelLen | toJson }}
engine:
  block_size: {{ $v.engine.blockSize | toJson }}
  num_blocks: {{ $v.engine.numBlocks | toJson }}
  kv_cache_memory_gb: {{ $v.engine.kvCacheMemoryGb | toJson }}
  max_num_seqs: {{ $v.engine.maxNumSeqs | toJson }}
  max_num_batched_tokens: {{ $v.engine.maxNumBatchedTokens | toJson }}
  prompt_chunk_tokens: {{ $v.engine.promptChunkTokens | toJson }}
  device: {{ $v.engine.device | toJson }}
  fp8_attention_min_tokens: {{ $v.engine.fp8AttentionMinTokens | toJson }}
  overlap_schedule: {{ $v.engine.overlapSchedule | toJson }}
prefill:
  {{- include "pdserve.poolConfig" (dict "Values" $v "role" "prefill") | nindent 2 }}
decode:
  {{- include "pdserve.poolConfig" (dict "Values" $v "role" "decode") | nindent 2 }}
kv_transfer:
  dtype: {{ $v.kvTransfer.dtype | toJson }}
  backend: {{ $v.kvTransfer.backend | toJson }}
  lease_seconds: {{ $v.kvTransfer.leaseSeconds | toJson }}
  refresh_sink_tokens: {{ $v.kvTransfer.refreshSinkTokens | toJson }}
router:
  host: "0.0.0.0"
  port: {{ $v.router.port | toJson }}
  http_port: {{ $v.router.httpPort | toJson }}
  metrics_port: {{ ternary $v.router.metricsPort nil $v.metrics.enabled | toJson }}
  policy: {{ $v.router.policy | toJson }}
  max_queued_requests: {{ $v.router.maxQueuedRequests | toJson }}
  load_balance_slack: {{ $v.router.loadBalanceSlack | toJson }}
  drain_timeout_s: {{ $v.router.drainTimeoutS | toJson }}
  {{- if $v.router.tls.secretName }}
  tls_cert_file: {{ include "pdserve.tlsDir" . }}/tls.crt
  tls_key_file: {{ include "pdserve.tlsDir" . }}/tls.key
  {{- if $v.router.tls.clientAuth }}
  tls_client_ca_file: {{ include "pdserve.tlsDir" . }}/ca.crt
  {{- end }}
  {{- end }}
  {{- if $v.router.auth.tokenSecretName }}
  auth_token_file: {{ include "pdserve.tokenFile" . }}
  {{- end }}
autoscaling:
  enabled: {{ $v.autoscaling.enabled | toJson }}
  interval_s: {{ $v.autoscaling.intervalS | toJson }}
  cooldown_s: {{ $v.autoscaling.cooldownS | toJson }}
  target_ttft_s: {{ $v.autoscaling.targetTtftS | toJson }}
  target_itl_s: {{ $v.autoscaling.targetItlS | toJson }}
  {{- range $role := list "prefill" "decode" }}
  {{ $role }}:
    min_replicas: {{ int (index $v $role).minReplicas }}
    max_replicas: {{ int (index $v $role).maxReplicas }}
    target: {{ (index $v.autoscaling $role).target | toJson }}
  {{- end }}
ray:
  address: auto
{{- if $v.tracing.otlpEndpoint }}
tracing:
  otlp_endpoint: {{ $v.tracing.otlpEndpoint | toJson }}
  service_name: {{ $v.tracing.serviceName | toJson }}
  sample_ratio: {{ $v.tracing.sampleRatio | toJson }}
{{- end }}
{{- end -}}

{{/* The config's checksum without the pool sizes and their bounds: scaling happens live and
must not restart the cluster. */}}
{{- define "pdserve.configChecksum" -}}
{{- $values := deepCopy .Values -}}
{{- range $role := list "prefill" "decode" -}}
{{- $_ := set (index $values $role) "replicas" 0 -}}
{{- $_ := set (index $values $role) "minReplicas" 0 -}}
{{- $_ := set (index $values $role) "maxReplicas" 0 -}}
{{- end -}}
{{- include "pdserve.config" (dict "Values" $values) | sha256sum -}}
{{- end -}}

{{/* Where the router's TLS Secret and token Secret are mounted (head pod, scale Job): beside /etc/pdserve, not in it, as
kubelet cannot make a mount point inside the read-only ConfigMap volume. */}}
{{- define "pdserve.tlsDir" -}}
/etc/pdserve-tls
{{- end -}}

{{- define "pdserve.tokenFile" -}}
/etc/pdserve-auth/{{ .Values.router.auth.tokenSecretKey }}
{{- end -}}

{{/* The volumes of the router's Secrets, and their mounts. */}}
{{- define "pdserve.secretVolumes" -}}
{{- with .Values.router.tls.secretName }}
- name: router-tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .Values.router.auth.tokenSecretName }}
- name: router-token
  secret:
    secretName: {{ . }}
{{- end }}
{{- end -}}

{{- define "pdserve.secretMounts" -}}
{{- if .Values.router.tls.secretName }}
- {name: router-tls, mountPath: {{ include "pdserve.tlsDir" . }}, readOnly: true}
{{- end }}
{{- if .Values.router.auth.tokenSecretName }}
- {name: router-token, mountPath: /etc/pdserve-auth, readOnly: true}
{{- end }}
{{- end -}}

{{/* Volumes every Ray pod has: /dev/shm for Ray's object store and NIXL/UCX shared memory. */}}
{{- define "pdserve.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end -}}
