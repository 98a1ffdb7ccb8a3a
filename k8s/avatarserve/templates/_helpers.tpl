{{/* vim: set filetype=mustache: */}}

{{/* The chart name (app.kubernetes.io/name). */}}
{{- define "avatarserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The RayService name: the release name (or fullnameOverride). KubeRay names the Serve Service `<name>-serve-svc`,
so clients reach `<release>-serve-svc:<serve.grpcPort>`. KubeRay rejects RayService names that are not DNS-1035
labels or longer than 47 characters (its RayCluster gets a 6-character suffix): fail here, not in the operator.
*/}}
{{- define "avatarserve.fullname" -}}
{{- $name := default .Release.Name .Values.fullnameOverride -}}
{{- if gt (len $name) 47 -}}
{{- fail (printf "RayService name %q is longer than 47 characters (KubeRay's limit): use a shorter release name or fullnameOverride" $name) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "RayService name %q must be a DNS-1035 label (lower case letters, digits, '-', starting with a letter): use another release name or fullnameOverride" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "avatarserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "avatarserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "avatarserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "avatarserve.labels" -}}
helm.sh/chart: {{ include "avatarserve.chart" . }}
{{ include "avatarserve.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of every Ray pod of this release (NetworkPolicies and PodMonitors select by them). */}}
{{- define "avatarserve.raySelectorLabels" -}}
{{ include "avatarserve.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end -}}

{{- define "avatarserve.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "avatarserve.fullname" .) -}}
{{- end -}}

{{/* ------------------------------------------------------------------------------------------------ Redis */}}

{{- define "avatarserve.redis.fullname" -}}
{{- printf "%s-redis" (include "avatarserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Redis URL every Ray container gets as REDIS_URL (never a password in it). */}}
{{- define "avatarserve.redis.url" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc:6379/0" (include "avatarserve.redis.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- if not .Values.redis.url -}}
{{- fail "redis.enabled is false: set redis.url to the external Redis (redis://host:6379/0)" -}}
{{- end -}}
{{- if (urlParse .Values.redis.url).userinfo -}}
{{- fail "redis.url must not contain credentials: put the password into a Secret (redis.auth.existingSecret)" -}}
{{- end -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* host:port of that Redis (GCS fault tolerance). */}}
{{- define "avatarserve.redis.address" -}}
{{- if .Values.gcsFaultTolerance.redisAddress -}}
{{- .Values.gcsFaultTolerance.redisAddress -}}
{{- else if .Values.redis.enabled -}}
{{- printf "%s.%s.svc:6379" (include "avatarserve.redis.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- $host := (urlParse .Values.redis.url).host -}}
{{- if contains ":" $host -}}{{ $host }}{{- else -}}{{ printf "%s:6379" $host }}{{- end -}}
{{- end -}}
{{- end -}}

{{- define "avatarserve.redis.secretName" -}}
{{- default (include "avatarserve.redis.fullname" .) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "avatarserve.redis.secretKey" -}}
{{- if .Values.redis.auth.existingSecret -}}{{ .Values.redis.auth.existingSecretPasswordKey }}{{- else -}}redis-password{{- end -}}
{{- end -}}

{{/* The password's secretKeyRef (REDIS_PASSWORD of every Ray container, the Redis server, GCS FT). */}}
{{- define "avatarserve.redis.passwordRef" -}}
secretKeyRef:
  name: {{ include "avatarserve.redis.secretName" . }}
  key: {{ include "avatarserve.redis.secretKey" . }}
{{- end -}}

{{/* ------------------------------------------------------------------------------------- the Serve application */}}

{{/*
The application's args: `app` without name / route_prefix, plus what the cluster decides (one value each):
data_plane.port_min/port_max from `dataPlane`, and the placement resource for the pinned roles.
Returned as JSON (include ... | fromJson).
*/}}
{{- define "avatarserve.appArgs" -}}
{{- $app := deepCopy .Values.app -}}
{{- $_ := unset $app "name" -}}
{{- $_ = unset $app "route_prefix" -}}
{{- if hasKey $app "redis_url" -}}
{{- fail "app.redis_url must stay unset on Kubernetes: every Ray container gets REDIS_URL / REDIS_PASSWORD from the chart (redis.*)" -}}
{{- end -}}
{{- $dp := default dict (get $app "data_plane") -}}
{{- if or (hasKey $dp "port_min") (hasKey $dp "port_max") -}}
{{- fail "app.data_plane.port_min/port_max come from dataPlane.portMin/portMax (the NetworkPolicy uses the same range): set those instead" -}}
{{- end -}}
{{- $min := .Values.dataPlane.portMin -}}
{{- $max := .Values.dataPlane.portMax -}}
{{- if ne (kindIs "invalid" $min) (kindIs "invalid" $max) -}}
{{- fail "dataPlane.portMin and dataPlane.portMax go together (both set, or both null)" -}}
{{- end -}}
{{- if not (kindIs "invalid" $min) -}}
{{- if gt (int $min) (int $max) -}}
{{- fail (printf "dataPlane.portMin (%v) must be <= dataPlane.portMax (%v)" $min $max) -}}
{{- end -}}
{{- $_ = set $dp "port_min" (int $min) -}}
{{- $_ = set $dp "port_max" (int $max) -}}
{{- end -}}
{{- if $dp -}}
{{- $_ = set $app "data_plane" $dp -}}
{{- end -}}
{{- with .Values.apiKeys.existingSecret -}}
{{- $auth := default dict (get $app "auth") -}}
{{- if hasKey $auth "keys_file" -}}
{{- fail "app.auth.keys_file comes from apiKeys.* (the Secret the chart mounts): set apiKeys.existingSecret instead" -}}
{{- end -}}
{{- $_ = set $auth "keys_file" (printf "%s/%s" $.Values.apiKeys.mountPath $.Values.apiKeys.secretKey) -}}
{{- $_ = set $app "auth" $auth -}}
{{- end -}}
{{- $p := .Values.placement -}}
{{- if $p.roles -}}
{{- $resources := default dict (get $app "resources") -}}
{{- range $role := $p.roles -}}
{{- $r := default dict (get $resources $role) -}}
{{- $custom := default dict (get $r "resources") -}}
{{- if hasKey $custom $p.resource -}}
{{- fail (printf "app.resources.%s.resources.%s is set by the chart (placement.*): remove it from app" $role $p.resource) -}}
{{- end -}}
{{- $_ = set $custom $p.resource 1 -}}
{{- $_ = set $r "resources" $custom -}}
{{- $_ = set $resources $role $r -}}
{{- end -}}
{{- $_ = set $app "resources" $resources -}}
{{- end -}}
{{- toJson $app -}}
{{- end -}}

{{/*
serveConfigV2: the Serve proxies (HTTP on 0.0.0.0, gRPC with the servicer functions of builder.grpc_options())
and the one application, as builder.serve_config() writes it.
*/}}
{{- define "avatarserve.serveConfig" -}}
{{- $args := include "avatarserve.appArgs" . | fromJson -}}
{{- $application := dict "name" .Values.app.name "route_prefix" .Values.app.route_prefix "import_path" "avatarserve.serve.builder:build_app" "args" $args -}}
{{- $autoscaling := default dict (get .Values.app "autoscaling") -}}
{{- if get $autoscaling "enabled" -}}
{{- $_ := set $application "autoscaling_policy" (dict "policy_function" "avatarserve.serve.control.autoscale:SessionAutoscalingPolicy" "policy_kwargs" (dict "app" $args)) -}}
{{- end -}}
{{- $grpc := dict "port" (int .Values.serve.grpcPort) "enable_reflection" true "grpc_servicer_functions" (list "avatarserve.serve.api.grpc_service.add_AvatarServiceServicer_to_server" "avatarserve.serve.api.grpc_service.add_HealthServicer_to_server") -}}
{{- $http := dict "host" "0.0.0.0" "port" (int .Values.serve.httpPort) -}}
{{- $cfg := dict "proxy_location" .Values.serve.proxyLocation "http_options" $http "grpc_options" $grpc "applications" (list $application) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* --------------------------------------------------------------------------------------------- Ray groups */}}

{{/* The worker groups that are rendered: list of dicts with `name` and `spec` (the values). */}}
{{- define "avatarserve.workerGroups" -}}
{{- $groups := list -}}
{{- if not .Values.worker.disabled -}}
{{- $groups = append $groups (dict "name" .Values.worker.groupName "spec" .Values.worker) -}}
{{- end -}}
{{- range $name, $spec := .Values.additionalWorkerGroups -}}
{{- if not $spec.disabled -}}
{{- $groups = append $groups (dict "name" $name "spec" $spec) -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "groups" $groups) -}}
{{- end -}}

{{/*
rayStartParams of a group (all strings): the group's own, plus `resources` from rayResources and, for the
placement group, the placement resource. Args: dict root, spec, isPlacement.
*/}}
{{- define "avatarserve.rayStartParams" -}}
{{- $spec := .spec -}}
{{- $params := deepCopy (default dict $spec.rayStartParams) -}}
{{- if hasKey $params "resources" -}}
{{- fail "rayStartParams.resources: use the group's rayResources map instead (the chart adds the placement resource to it)" -}}
{{- end -}}
{{- $res := deepCopy (default dict $spec.rayResources) -}}
{{- if .isPlacement -}}
{{- $p := .root.Values.placement -}}
{{- $_ := set $res $p.resource (int $p.amount) -}}
{{- end -}}
{{- if $res -}}
{{- $ints := dict -}}
{{- range $k, $v := $res -}}{{- $_ := set $ints $k (int $v) -}}{{- end -}}
{{- $_ := set $params "resources" (printf "'%s'" (toJson $ints)) -}}
{{- end -}}
{{- if $params }}
{{- range $k, $v := $params }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- else -}}
{}
{{- end -}}
{{- end -}}

{{/* Env of a Ray container. Args: dict root, spec, isHead. */}}
{{- define "avatarserve.rayEnv" -}}
{{- $root := .root -}}
- name: REDIS_URL
  value: {{ include "avatarserve.redis.url" $root | quote }}
{{- if $root.Values.redis.auth.enabled }}
{{- /* KubeRay puts REDIS_PASSWORD (from gcsFaultToleranceOptions.redisPassword, the same Secret) into the head
container itself when GCS fault tolerance is on, and rejects a head container that sets it too. */}}
{{- if not (and .isHead $root.Values.gcsFaultTolerance.enabled) }}
- name: REDIS_PASSWORD
  valueFrom:
    {{- include "avatarserve.redis.passwordRef" $root | nindent 4 }}
{{- end }}
{{- end }}
{{- with $root.Values.common.containerEnv }}
{{ toYaml . }}
{{- end }}
{{- with .spec.containerEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The pod template of a group. Args: dict root, spec, isHead. */}}
{{- define "avatarserve.podTemplate" -}}
{{- $root := .root -}}
{{- $spec := .spec -}}
{{- $img := default dict $spec.image -}}
metadata:
  labels:
    {{- include "avatarserve.labels" $root | nindent 4 }}
    app.kubernetes.io/component: ray
    {{- with $spec.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $spec.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $spec.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $spec.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .isHead }}
      image: "{{ default $root.Values.image.repository $img.repository }}:{{ default (default $root.Chart.AppVersion $root.Values.image.tag) $img.tag }}"
      imagePullPolicy: {{ default $root.Values.image.pullPolicy $img.pullPolicy }}
      env:
        {{- include "avatarserve.rayEnv" . | nindent 8 }}
      {{- with $spec.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        {{- if .isHead }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        - {name: serve, containerPort: {{ int $root.Values.serve.httpPort }}}
        - {name: serve-grpc, containerPort: {{ int $root.Values.serve.grpcPort }}}
        - {name: as-metrics, containerPort: 44217}
        - {name: dash-metrics, containerPort: 44227}
        {{- end }}
        - {name: metrics, containerPort: 8080}
      {{- with $spec.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $spec.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - {name: ray-logs, mountPath: /tmp/ray}
        {{- if $root.Values.apiKeys.existingSecret }}
        - {name: api-keys, mountPath: {{ $root.Values.apiKeys.mountPath | quote }}, readOnly: true}
        {{- end }}
        {{- with $spec.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - {name: ray-logs, emptyDir: {}}
    {{- with $root.Values.apiKeys.existingSecret }}
    - {name: api-keys, secret: {secretName: {{ . | quote }}}}
    {{- end }}
    {{- with $spec.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
