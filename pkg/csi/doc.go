// Package csi holds what the RBD and CephFS drivers share: the gRPC server, the
// identity service, request validation, per-volume locks, volume ID encoding,
// the clusters file, credentials and the Ceph connection cache.
package csi
