// Package cephfs is the CephFS flavour of the driver: the CSI Controller
// service makes each volume a subvolume of a subvolume group, written directly
// through libcephfs in the on-disk layout of the mgr volumes module (subvolume
// v2), so that `ceph fs subvolume` commands keep working on it, or, for a
// provisioner user without the MDS caps that needs (ceph-csi's caps), made
// through the mgr volumes module itself; either way tracked by an omap journal
// that also remembers every removal it has promised.
package cephfs
