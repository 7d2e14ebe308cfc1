{{/* One KubeRay worker group: pods of one pool, each advertising pdserve_<role> so that exactly
one pdserve worker of that pool lands on each pod. */}}
{{- define "pdserve.workerGroup" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $p := index $root.Values $role -}}
{{- $limits := deepCopy ($p.resources.limits | default dict) -}}
{{- if gt (int $p.gpus) 0 }}{{- $_ := set $limits "nvidia.com/gpu" (int $p.gpus) }}{{- end }}
{{- if $p.rdma.enabled }}{{- $_ := set $limits $p.rdma.resourceName (int $p.rdma.count) }}{{- end }}
{{- $resources := merge (dict "limits" $limits) (deepCopy $p.resources) -}}
{{- $ucx := $root.Values.kvTransfer.ucx -}}
{{- $env := list -}}
{{- with $ucx.tls }}{{ $env = append $env (dict "name" "UCX_TLS" "value" .) }}{{ end -}}
{{- with $ucx.netDevices }}{{ $env = append $env (dict "name" "UCX_NET_DEVICES" "value" .) }}{{ end -}}
{{- $env = concat $env ($root.Values.extraEnv | default list) ($p.env | default list) -}}
- groupName: {{ $role }}
  replicas: {{ int $p.replicas }}
  minReplicas: {{ int $p.minReplicas }}
  maxReplicas: {{ int $p.maxReplicas }}
  rayStartParams:
    # KubeRay's format: a JSON object in its own shell quotes
    resources: {{ printf "\"{\\\"%s\\\": 1}\"" (include "pdserve.rayResource" $role) | squote }}
  template:
    metadata:
      labels:
        {{- include "pdserve.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $role }}
        {{- with $p.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $p.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with $root.Values.image.pullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "pdserve.image" (dict "root" $root "own" $p.image) }}
          imagePullPolicy: {{ ($p.image).pullPolicy | default $root.Values.image.pullPolicy }}
          command: ["/bin/bash", "-c", "--"]
          # the inner shell keeps the quoted JSON of --resources intact
          args:
            - 'ulimit -n 65536; exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"'
          {{- with $env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          {{- if $p.ipcLock }}
          securityContext:
            # NIXL/UCX pin (register) the KV cache memory for RDMA
            capabilities:
              add: ["IPC_LOCK"]
          {{- end }}
          volumeMounts:
            - {name: dshm, mountPath: /dev/shm}
            {{- with $root.Values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "pdserve.shmVolume" $p.shmSize | nindent 8 }}
        {{- with $root.Values.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $p.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $p.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $p.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
