// Package rbd is the RBD flavour of the driver: the CSI Controller service
// (images in a pool, tracked by an omap journal) and the Node service's
// Stager (map the image with a Mounter, make and mount a filesystem), which
// pkg/csi's node skeleton wraps.
package rbd
