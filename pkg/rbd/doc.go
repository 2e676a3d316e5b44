// Package rbd is the RBD flavour of the driver: the CSI Controller service
// (images in a pool, tracked by an omap journal) and the Node service (map the
// image with a Mounter, make and mount a filesystem, bind it into pods).
package rbd
