{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "weft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name prefix of every resource ("weft" for a release named "weft").
*/}}
{{- define "weft.fullname" -}}
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

{{/*
Name of a component's resources: weft.componentName (dict "ctx" $ "component" "operator").
*/}}
{{- define "weft.componentName" -}}
{{- printf "%s-%s" (include "weft.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Chart label value.
*/}}
{{- define "weft.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: weft.selectorLabels (dict "ctx" $ "component" "agent").
*/}}
{{- define "weft.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weft.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
All labels: weft.labels (dict "ctx" $ "component" "agent").
Standard labels win over commonLabels with the same key.
*/}}
{{- define "weft.labels" -}}
{{- $std := dict
  "helm.sh/chart" (include "weft.chart" .ctx)
  "app.kubernetes.io/name" (include "weft.name" .ctx)
  "app.kubernetes.io/instance" .ctx.Release.Name
  "app.kubernetes.io/component" .component
  "app.kubernetes.io/version" (.ctx.Chart.AppVersion | toString)
  "app.kubernetes.io/managed-by" .ctx.Release.Service
  "app.kubernetes.io/part-of" "weft" }}
{{- toYaml (merge $std (.ctx.Values.commonLabels | default dict)) }}
{{- end }}

{{/*
Container image reference.
*/}}
{{- define "weft.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
Flags shared by all daemons.
*/}}
{{- define "weft.commonArgs" -}}
- --log-level
- {{ .Values.logLevel | quote }}
- --log-format
- {{ .Values.logFormat | quote }}
- --cluster-name
- {{ .Values.cluster.name | quote }}
- --cluster-id
- {{ .Values.cluster.id | toString | quote }}
{{- end }}

{{/*
Liveness and readiness probes on the admin endpoint (port name "admin").
*/}}
{{- define "weft.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: admin
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: admin
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}

{{/*
Name of the Secret mounted by the clustermesh-apiserver.
*/}}
{{- define "weft.clustermesh.serverTlsSecretName" -}}
{{- .Values.clustermesh.tls.existingSecret | default (include "weft.componentName" (dict "ctx" . "component" "clustermesh-server-tls")) }}
{{- end }}

{{/*
Validate values; included by the agent DaemonSet (always rendered).
*/}}
{{- define "weft.validate" -}}
{{- if not .Values.logLevel }}
{{- fail "logLevel must be set: trace, debug, info, warn or error (or a filter directive such as info,weft_agent=debug)" }}
{{- end }}
{{- if not (has .Values.logFormat (list "json" "text")) }}
{{- fail (printf "logFormat must be json or text (got %q)" (toString .Values.logFormat)) }}
{{- end }}
{{- if not (has .Values.routingMode (list "native" "tunnel")) }}
{{- fail (printf "routingMode must be native or tunnel (got %q)" (toString .Values.routingMode)) }}
{{- end }}
{{- $id := .Values.cluster.id | int }}
{{- if or (lt $id 1) (gt $id 511) (ne (toString $id) (toString .Values.cluster.id)) }}
{{- fail (printf "cluster.id must be an integer between 1 and 511 (got %v)" .Values.cluster.id) }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$" (toString .Values.cluster.name)) }}
{{- fail (printf "cluster.name must be a DNS label of at most 32 characters: lowercase letters, digits and '-', starting and ending with a letter or digit (got %q)" (toString .Values.cluster.name)) }}
{{- end }}
{{- if and (gt (.Values.operator.replicas | int) 1) (not .Values.operator.leaderElection) }}
{{- fail "operator.leaderElection must be true when operator.replicas > 1" }}
{{- end }}
{{- if not (regexMatch "^[-._a-zA-Z0-9]+\\.conflist$" (toString .Values.cni.confFileName)) }}
{{- fail (printf "cni.confFileName must be a plain file name ending in .conflist (got %q)" (toString .Values.cni.confFileName)) }}
{{- end }}
{{- if not (hasPrefix "/run/weft/" .Values.cni.agentSocket) }}
{{- fail (printf "cni.agentSocket must be under /run/weft/, the host directory shared by weft-agent and weft-cni (got %q)" .Values.cni.agentSocket) }}
{{- end }}
{{- end }}
