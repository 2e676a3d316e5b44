{{/* The node DaemonSet of one driver: .root is the chart's context, .d the
driver (type, driverName, name, component, serviceAccount, defaultMounter,
metricsPort, podEvents, extraArgs). */}}
{{- define "rookzmq.node" -}}
{{- $r := .root }}
{{- $d := .d }}
{{- $plugins := printf "%s/plugins" $r.Values.kubeletDir }}
{{- /* FUSE mounts (rbd-fuse) live in the state directory: under kubelet's directory by
default, whose Bidirectional mount puts them in the host's mount namespace. */}}
{{- $state := printf "%s/%s/state" $plugins $d.driverName }}
{{- with $r.Values.node.stateDir }}
{{- $state = printf "%s/%s" . $d.driverName }}
{{- end }}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ $d.name }}
  namespace: {{ $r.Release.Namespace }}
  labels:
    {{- include "rookzmq.labels" $r | nindent 4 }}
    app.kubernetes.io/component: {{ $d.component }}
spec:
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ $r.Release.Name }}
      app.kubernetes.io/component: {{ $d.component }}
  updateStrategy:
    type: RollingUpdate
  template:
    metadata:
      labels:
        {{- include "rookzmq.labels" $r | nindent 8 }}
        app.kubernetes.io/component: {{ $d.component }}
      annotations:
        checksum/clusters: {{ $r.Values.clusters | toJson | sha256sum | trunc 16 }}
    spec:
      serviceAccountName: {{ $d.serviceAccount }}
      priorityClassName: {{ $r.Values.node.priorityClassName }}
      hostNetwork: true
      # FUSE daemons (rbd-fuse, ceph-fuse) must outlive this pod: in a PID namespace of the
      # pod's own, the kernel kills them when the plugin exits, whatever their
      # cgroup (see node.fuseCgroup).
      hostPID: {{ ne $r.Values.node.fuseCgroup "" }}
      dnsPolicy: ClusterFirstWithHostNet
      {{- with $r.Values.node.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $r.Values.node.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: rookzmq
          image: {{ include "rookzmq.image" $r }}
          imagePullPolicy: {{ $r.Values.image.pullPolicy }}
          securityContext:
            privileged: true
            capabilities:
              add: [SYS_ADMIN]
            allowPrivilegeEscalation: true
          args:
            - --type={{ $d.type }}
            - --node
            - --nodeid=$(NODE_NAME)
            - --drivername={{ $d.driverName }}
            - --endpoint=unix://{{ $plugins }}/{{ $d.driverName }}/csi.sock
            - --registration-dir={{ $r.Values.kubeletDir }}/plugins_registry
            - --clusters=/etc/rookzmq/config.json
            - --default-mounter={{ $d.defaultMounter }}
            - --statedir={{ $state }}
            - --fuse-cgroup={{ $r.Values.node.fuseCgroup }}
            - --events-dir={{ $plugins }}/{{ $d.driverName }}/events
            {{- if $d.podEvents }}
            - --events-endpoint=unix://{{ $plugins }}/events.rookzmq.io/csi.sock
            {{- else }}
            - --events-endpoint=
            {{- end }}
            - --events-heartbeat={{ $r.Values.node.events.heartbeat }}
            - --events-journal-bytes={{ int64 $r.Values.node.events.journalBytes }}
            - --events-journal-age={{ $r.Values.node.events.journalAge }}
            {{- if $r.Values.node.metrics.enabled }}
            - --metrics-address={{ $r.Values.node.metrics.host }}:{{ $d.metricsPort }}
            {{- end }}
            - -v={{ $r.Values.logLevel }}
            {{- range $d.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            - name: NODE_NAME
              valueFrom:
                fieldRef: {fieldPath: spec.nodeName}
            {{- include "rookzmq.apiEnv" $r | nindent 12 }}
          {{- if $r.Values.node.metrics.enabled }}
          ports:
            - name: metrics
              containerPort: {{ $d.metricsPort }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: {{ $d.metricsPort }}
              {{- with $r.Values.node.metrics.probeHost }}
              host: {{ . }}
              {{- end }}
            initialDelaySeconds: 10
            periodSeconds: 20
            timeoutSeconds: 5
            failureThreshold: 3
          # Ready once it serves: after it checked the volumes staged before it started.
          readinessProbe:
            httpGet:
              path: /healthz
              port: {{ $d.metricsPort }}
              {{- with $r.Values.node.metrics.probeHost }}
              host: {{ . }}
              {{- end }}
            periodSeconds: 2
            timeoutSeconds: 5
          {{- end }}
          resources:
            {{- toYaml $r.Values.node.resources | nindent 12 }}
          volumeMounts:
            - name: kubelet-dir
              mountPath: {{ $r.Values.kubeletDir }}
              mountPropagation: Bidirectional
            {{- with $r.Values.node.stateDir }}
            # FUSE mounts live here: Bidirectional puts them in the host's
            # mount namespace, where the next plugin pod finds them.
            - {name: state-dir, mountPath: {{ . }}, mountPropagation: Bidirectional}
            {{- end }}
            - {name: dev, mountPath: /dev}
            - {name: sys, mountPath: /sys}
            - {name: lib-modules, mountPath: /lib/modules, readOnly: true}
            - {name: clusters, mountPath: /etc/rookzmq, readOnly: true}
      volumes:
        - name: kubelet-dir
          hostPath: {path: {{ $r.Values.kubeletDir }}, type: Directory}
        {{- with $r.Values.node.stateDir }}
        - name: state-dir
          hostPath: {path: {{ . }}, type: DirectoryOrCreate}
        {{- end }}
        - name: dev
          hostPath: {path: /dev, type: Directory}
        - name: sys
          hostPath: {path: /sys, type: Directory}
        - name: lib-modules
          hostPath: {path: /lib/modules, type: DirectoryOrCreate}
        - name: clusters
          configMap:
            name: {{ include "rookzmq.fullname" $r }}-clusters
{{- end -}}
