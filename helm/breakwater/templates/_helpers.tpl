{{/* The release's base name, at most 40 characters so suffixes fit. */}}
{{- define "breakwater.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "breakwater.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "x"). */}}
{{- define "breakwater.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "breakwater.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "breakwater.initImage" -}}
{{- printf "%s:%s" .Values.intercept.image.repository (default .Chart.AppVersion .Values.intercept.image.tag) -}}
{{- end -}}

{{- define "breakwater.tokenSecret" -}}
{{- default "breakwater-token" .Values.controlPlane.auth.existingSecret -}}
{{- end -}}

{{/*
The policy file: the user's, with the sidecar's ports set and, when the
chart runs the control plane and the file names none, the sidecars pointed
at it with the token the injector mounts (so that upstreams with
`dead_letter: true` deliver their letters).
*/}}
{{- define "breakwater.policies" -}}
{{- $file := deepCopy .Values.policies.file -}}
{{- if and .Values.controlPlane.enabled (not (hasKey $file "control_plane")) -}}
{{- $cp := dict "url" (printf "http://%s-control-plane.%s.svc:%d" (include "breakwater.fullname" .) .Release.Namespace (int .Values.controlPlane.grpcPort)) -}}
{{- if .Values.controlPlane.auth.enabled -}}
{{- $_ := set $cp "token_file" "/var/run/breakwater/token" -}}
{{- end -}}
{{- $_ := set $file "control_plane" $cp -}}
{{- end -}}
{{- $_ := set $file "admin" (dict "listen" (printf "127.0.0.1:%d" (int .Values.sidecar.adminPort)) "probes_listen" (printf "0.0.0.0:%d" (int .Values.sidecar.probesPort))) -}}
{{- $_ := set $file "proxy" (dict "listen" (printf "127.0.0.1:%d" (int .Values.sidecar.proxyPort))) -}}
{{- toYaml $file -}}
{{- end -}}

{{/*
The sidecar container, for pod specs in clusters without the webhook: put it
under `initContainers:` (it is a native sidecar, `restartPolicy: Always`),
and add the volumes from "breakwater.sidecarVolumes" to the pod. Takes the
chart's root context (include it from a chart that has this one as a
dependency):

  initContainers:
    {{- include "breakwater.sidecar" . | nindent 4 }}
  volumes:
    {{- include "breakwater.sidecarVolumes" . | nindent 4 }}
*/}}
{{- define "breakwater.sidecar" -}}
- name: breakwater
  image: {{ include "breakwater.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  restartPolicy: Always
  args: [sidecar, --config, /etc/breakwater/policies.yaml, --log-format, json]
  env:
    - name: TMPDIR
      value: /tmp
  ports:
    - {name: bw-proxy, containerPort: {{ .Values.sidecar.proxyPort }}, protocol: TCP}
    - {name: bw-admin, containerPort: {{ .Values.sidecar.adminPort }}, protocol: TCP}
    - {name: bw-probes, containerPort: {{ .Values.sidecar.probesPort }}, protocol: TCP}
  startupProbe:
    httpGet: {path: /readyz, port: bw-probes}
    periodSeconds: 1
    failureThreshold: 30
  readinessProbe:
    httpGet: {path: /readyz, port: bw-probes}
    periodSeconds: 5
    failureThreshold: 3
  livenessProbe:
    httpGet: {path: /healthz, port: bw-probes}
    periodSeconds: 5
    failureThreshold: 3
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- include "breakwater.securityContext" . | nindent 4 }}
  volumeMounts:
    - {name: breakwater-policies, mountPath: /etc/breakwater, readOnly: true}
    - {name: breakwater-tmp, mountPath: /tmp}
    - {name: breakwater-token, mountPath: /var/run/breakwater, readOnly: true}
{{- end -}}

{{/*
The init container that redirects the pod's outbound TCP to the sidecar
(interception in iptables mode), for pod specs in clusters without the
webhook: put it under `initContainers:` before "breakwater.sidecar". It
needs NET_ADMIN and NET_RAW, and runs as root, once.
*/}}
{{- define "breakwater.init" -}}
- name: breakwater-init
  image: {{ include "breakwater.initImage" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - init
    - --redirect-port
    - {{ .Values.sidecar.proxyPort | quote }}
    - --exclude-uid
    - "65532"
    {{- with .Values.intercept.excludeOutboundPorts }}
    - --exclude-ports
    - {{ join "," . | quote }}
    {{- end }}
    {{- with .Values.intercept.excludeOutboundCIDRs }}
    - --exclude-cidrs
    - {{ join "," . | quote }}
    {{- end }}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 64Mi}
  securityContext:
    runAsNonRoot: false
    runAsUser: 0
    runAsGroup: 0
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    privileged: false
    capabilities: {add: [NET_ADMIN, NET_RAW], drop: [ALL]}
    seccompProfile: {type: RuntimeDefault}
  volumeMounts:
    - {name: breakwater-tmp, mountPath: /run}
{{- end -}}

{{- define "breakwater.sidecarVolumes" -}}
- name: breakwater-policies
  configMap: {name: {{ .Values.policies.configMapName }}}
- name: breakwater-tmp
  emptyDir: {sizeLimit: 256Mi}
- name: breakwater-token
  secret: {secretName: {{ include "breakwater.tokenSecret" . }}, optional: true}
{{- end -}}

{{- define "breakwater.securityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/* Whether a Prometheus Operator kind is to be rendered: (list $ value kind). */}}
{{- define "breakwater.monitoringEnabled" -}}
{{- $root := index . 0 -}}{{- $value := index . 1 -}}{{- $kind := index . 2 -}}
{{- if eq (toString $value) "<nil>" -}}
{{- if $root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind) -}}true{{- end -}}
{{- else if $value -}}true{{- end -}}
{{- end -}}
