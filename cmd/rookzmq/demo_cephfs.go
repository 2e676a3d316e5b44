package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

var demoFSContent = []byte("hello from rookzmq: written in pod-a, read in pod-b, through one ceph-fuse mount of a CephFS subvolume\n")

// runCephFS walks one CephFS volume through create, stage, publish at two
// target paths at once (two "pods"), a write through one read through the
// other, a flush over ZeroMQ, stats, unpublish, unstage and delete.
func (d *demo) runCephFS(endpoint, clusterID, fsName, mounter, workDir string) error {
	d.start = time.Now()
	conn, err := grpc.NewClient("unix://"+strings.TrimPrefix(endpoint, "unix://"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ctrl, node, ident := csi.NewControllerClient(conn), csi.NewNodeClient(conn), csi.NewIdentityClient(conn)

	var info *csi.GetPluginInfoResponse
	if err := d.do("GetPluginInfo", func() (err error) { info, err = ident.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{}); return }); err != nil {
		return err
	}
	fmt.Printf("    driver %s %s\n", info.GetName(), info.GetVendorVersion())
	capability := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER},
	}
	name := fmt.Sprintf("demo-fs-%d", time.Now().UnixNano())
	params := map[string]string{"clusterID": clusterID, "fsName": fsName}
	if mounter != "" {
		params["mounter"] = mounter
	}
	var vol *csi.Volume
	if err := d.do("CreateVolume (RWX subvolume, 1 GiB quota)", func() error {
		r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30},
			VolumeCapabilities: []*csi.VolumeCapability{capability}, Secrets: d.adminSecrets, Parameters: params,
		})
		vol = r.GetVolume()
		if err == nil {
			d.note = "subvolume path " + vol.GetVolumeContext()["subvolumePath"]
		}
		return err
	}); err != nil {
		return err
	}
	fmt.Printf("    volume %s\n", vol.GetVolumeId())
	id := vol.GetVolumeId()
	staging := filepath.Join(workDir, "staging", name)
	pods := []string{filepath.Join(workDir, "pod-a", name), filepath.Join(workDir, "pod-b", name)}
	podCtx := func(pod string) map[string]string {
		vc := map[string]string{"csi.storage.k8s.io/pod.name": pod, "csi.storage.k8s.io/pod.namespace": "demo", "csi.storage.k8s.io/pod.uid": pod + "-uid"}
		for k, v := range vol.GetVolumeContext() {
			vc[k] = v
		}
		return vc
	}
	cleanup := func() { // best effort, so a failed demo leaves nothing behind
		c, cc := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cc()
		for _, p := range pods {
			node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: p})
		}
		node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: d.adminSecrets})
	}
	publish := func(i int) func() error {
		return func() error {
			_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
				TargetPath: pods[i], VolumeCapability: capability, VolumeContext: podCtx(filepath.Base(filepath.Dir(pods[i])))})
			return err
		}
	}
	unpublish := func(i int) func() error {
		return func() error {
			_, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: pods[i]})
			return err
		}
	}
	steps := []struct {
		what string
		f    func() error
	}{
		{"NodeStageVolume (ceph-fuse, once per node)", func() error {
			_, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
				VolumeCapability: capability, VolumeContext: vol.GetVolumeContext(), Secrets: d.secrets})
			return err
		}},
		{"NodePublishVolume into pod-a (bind mount)", publish(0)},
		{"NodePublishVolume into pod-b (bind mount)", publish(1)},
		{"pod-a writes a file", func() error { return writeData(filepath.Join(pods[0], "hello.txt"), demoFSContent) }},
		{"pod-b reads it", func() error {
			d.note = "both pods see one file system: " + pods[1] + "/hello.txt"
			return checkData(filepath.Join(pods[1], "hello.txt"), demoFSContent)
		}},
		{"flush over ZeroMQ (writes durable in RADOS)", func() error { return d.flush(id) }},
		{"NodeGetVolumeStats (quota and rstats)", func() error {
			r, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: pods[1]})
			if err == nil {
				u := r.GetUsage()[0]
				d.note = fmt.Sprintf("%d MiB quota, %d bytes used", u.GetTotal()>>20, u.GetUsed())
				if u.GetTotal() != 1<<30 {
					err = errors.New("the total is not the quota")
				}
			}
			return err
		}},
		{"NodeUnpublishVolume from pod-a", unpublish(0)},
		{"pod-b still reads the file", func() error { return checkData(filepath.Join(pods[1], "hello.txt"), demoFSContent) }},
		{"NodeUnpublishVolume from pod-b", unpublish(1)},
		{"NodeUnstageVolume (ceph-fuse exits)", func() error {
			_, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
			return err
		}},
		{"DeleteVolume", func() error {
			_, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: d.adminSecrets})
			return err
		}},
	}
	for _, s := range steps {
		if err := d.do(s.what, s.f); err != nil {
			cleanup()
			return fmt.Errorf("%s: %w", s.what, err)
		}
	}
	for _, p := range append(pods, staging) {
		os.Remove(filepath.Dir(p))
	}
	return nil
}
