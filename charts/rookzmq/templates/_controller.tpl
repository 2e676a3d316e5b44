{{/* The controller Deployment of one driver: .root is the chart's context, .d
the driver (type, driverName, name, component, serviceAccount, metricsPort,
extraArgs). */}}
{{- define "rookzmq.controller" -}}
{{- $r := .root }}
{{- $d := .d }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $d.name }}
  namespace: {{ $r.Release.Namespace }}
  labels:
    {{- include "rookzmq.labels" $r | nindent 4 }}
    app.kubernetes.io/component: {{ $d.component }}
spec:
  replicas: {{ $r.Values.controller.replicas }}
  {{- if $r.Values.controller.hostNetwork }}
  # One replica per node (see the anti-affinity): replace, never surge.
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxSurge: 0, maxUnavailable: 1}
  {{- end }}
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ $r.Release.Name }}
      app.kubernetes.io/component: {{ $d.component }}
  template:
    metadata:
      labels:
        {{- include "rookzmq.labels" $r | nindent 8 }}
        app.kubernetes.io/component: {{ $d.component }}
      annotations:
        checksum/clusters: {{ $r.Values.clusters | toJson | sha256sum | trunc 16 }}
    spec:
      serviceAccountName: {{ $d.serviceAccount }}
      priorityClassName: {{ $r.Values.controller.priorityClassName }}
      hostNetwork: {{ $r.Values.controller.hostNetwork }}
      {{- if $r.Values.controller.hostNetwork }}
      dnsPolicy: ClusterFirstWithHostNet
      {{- end }}
      {{- with $r.Values.controller.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $r.Values.controller.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $r.Values.controller.affinity }}
      affinity:
        {{- toYaml $r.Values.controller.affinity | nindent 8 }}
      {{- else if $r.Values.controller.hostNetwork }}
      # In the host network every replica has its node's hostname, which the
      # sidecars take as leader-election identity: one replica per node.
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - topologyKey: kubernetes.io/hostname
              labelSelector:
                matchLabels:
                  app.kubernetes.io/instance: {{ $r.Release.Name }}
                  app.kubernetes.io/component: {{ $d.component }}
      {{- end }}
      containers:
        - name: rookzmq
          image: {{ include "rookzmq.image" $r }}
          imagePullPolicy: {{ $r.Values.image.pullPolicy }}
          args:
            - --type={{ $d.type }}
            - --controller
            - --drivername={{ $d.driverName }}
            - --endpoint=unix:///csi/csi.sock
            - --clusters=/etc/rookzmq/config.json
            {{- if $r.Values.controller.credentialsSecret }}
            - --credentials-dir=/etc/rookzmq/credentials
            {{- end }}
            {{- if $r.Values.controller.metrics.enabled }}
            - --metrics-address=:{{ $d.metricsPort }}
            {{- end }}
            - -v={{ $r.Values.logLevel }}
            {{- range $d.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          {{- if $r.Values.controller.metrics.enabled }}
          ports:
            - name: metrics
              containerPort: {{ $d.metricsPort }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: {{ $d.metricsPort }}
            initialDelaySeconds: 10
            periodSeconds: 20
            timeoutSeconds: 5
            failureThreshold: 3
          {{- end }}
          env:
            {{- include "rookzmq.apiEnv" $r | nindent 12 }}
          resources:
            {{- toYaml $r.Values.controller.resources | nindent 12 }}
          volumeMounts:
            - {name: socket-dir, mountPath: /csi}
            - {name: clusters, mountPath: /etc/rookzmq, readOnly: true}
            {{- if $r.Values.controller.credentialsSecret }}
            - {name: credentials, mountPath: /etc/rookzmq/credentials, readOnly: true}
            {{- end }}
        - name: csi-provisioner
          image: {{ $r.Values.controller.provisioner.image }}
          imagePullPolicy: {{ $r.Values.controller.provisioner.pullPolicy }}
          args:
            - --csi-address=/csi/csi.sock
            - --extra-create-metadata
            - --leader-election
            - --leader-election-namespace={{ $r.Release.Namespace }}
            - --timeout=60s
            - --v={{ $r.Values.logLevel }}
            {{- range $r.Values.controller.provisioner.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            {{- include "rookzmq.apiEnv" $r | nindent 12 }}
          resources:
            {{- toYaml $r.Values.controller.sidecarResources | nindent 12 }}
          volumeMounts:
            - {name: socket-dir, mountPath: /csi}
        - name: csi-resizer
          image: {{ $r.Values.controller.resizer.image }}
          imagePullPolicy: {{ $r.Values.controller.resizer.pullPolicy }}
          args:
            - --csi-address=/csi/csi.sock
            - --leader-election
            - --leader-election-namespace={{ $r.Release.Namespace }}
            - --timeout=60s
            - --v={{ $r.Values.logLevel }}
            {{- range $r.Values.controller.resizer.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            {{- include "rookzmq.apiEnv" $r | nindent 12 }}
          resources:
            {{- toYaml $r.Values.controller.sidecarResources | nindent 12 }}
          volumeMounts:
            - {name: socket-dir, mountPath: /csi}
      volumes:
        - name: socket-dir
          emptyDir: {}
        - name: clusters
          configMap:
            name: {{ include "rookzmq.fullname" $r }}-clusters
        {{- if $r.Values.controller.credentialsSecret }}
        - name: credentials
          secret:
            secretName: {{ $r.Values.controller.credentialsSecret }}
            defaultMode: 0400
            optional: true
            items:
              {{- range $r.Values.clusters }}
              - {key: {{ printf "%s.userID" .clusterID | quote }}, path: {{ printf "%s/userID" .clusterID | quote }}}
              - {key: {{ printf "%s.userKey" .clusterID | quote }}, path: {{ printf "%s/userKey" .clusterID | quote }}}
              {{- end }}
        {{- end }}
{{- end -}}
