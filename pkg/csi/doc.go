// Package csi holds what the RBD and CephFS drivers share: the gRPC server, the
// identity service, request validation, per-volume locks, volume ID encoding,
// the clusters file, credentials, the Ceph connection cache, the event bridge
// glue, and the node skeleton (Node): stage records, events and acks, publish
// bind mounts and bounded probes around a driver's Stager.
package csi
