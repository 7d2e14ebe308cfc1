{{/* One KubeRay worker group: pods of one pool, each advertising workersPerPod units of pdserve_<role> so
that exactly that many pdserve workers of the pool land on each pod (each asks for one unit and `gpus` GPUs).
Pool sizes are counted in workers; the group's in pods, rounded up. */}}
{{- define "pdserve.workerGroup" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $p := index $root.Values $role -}}
{{- $limits := deepCopy ($p.resources.limits | default dict) -}}
{{- $per := int $p.workersPerPod -}}
{{- $podGpus := int (ceil (mulf $p.gpus $per)) -}}
{{- if gt $podGpus 0 }}{{- $_ := set $limits "nvidia.com/gpu" $podGpus }}{{- end }}
{{- if $p.rdma.enabled }}{{- $_ := set $limits $p.rdma.resourceName (int $p.rdma.count) }}{{- end }}
{{- $resources := merge (dict "limits" $limits) (deepCopy $p.resources) -}}
{{- $ucx := $root.Values.kvTransfer.ucx -}}
{{- $env := list -}}
{{- with $ucx.tls }}{{ $env = append $env (dict "name" "UCX_TLS" "value" .) }}{{ end -}}
{{- with $ucx.netDevices }}{{ $env = append $env (dict "name" "UCX_NET_DEVICES" "value" .) }}{{ end -}}
{{- $env = concat $env ($root.Values.extraEnv | default list) ($p.env | default list) -}}
- groupName: {{ $role }}
  replicas: {{ int (ceil (divf $p.replicas $per)) }}
  minReplicas: {{ int (ceil (divf $p.minReplicas $per)) }}
  maxReplicas: {{ int (ceil (divf $p.maxReplicas $per)) }}
  rayStartParams:
    # KubeRay's format: a JSON object in its own shell quotes
    resources: {{ printf "\"{\\\"%s\\\": %d}\"" (include "pdserve.rayResource" $role) $per | squote }}
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
