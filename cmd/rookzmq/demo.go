package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// runDemo walks one volume through create, stage, publish, write, read, expand,
// unpublish, unstage and delete over the driver's CSI socket, timing each step.
func runDemo(args []string) int {
	fs := flag.NewFlagSet("rookzmq demo", flag.ContinueOnError)
	endpoint := fs.String("endpoint", "unix:///tmp/rookzmq-demo/csi.sock", "driver CSI endpoint")
	clusterID := fs.String("cluster-id", "c1", "clusterID (an entry of the driver's clusters file)")
	pool := fs.String("pool", "rbd", "RBD pool")
	user := fs.String("user", "admin", "cephx user (the userID secret)")
	keyFile := fs.String("keyfile", "", "file holding the cephx key (the userKey secret); never pass keys as arguments")
	mounter := fs.String("mounter", "rbd-fuse", "mounter parameter (--type=cephfs: fuse or kernel; default the node's)")
	fsType := fs.String("fstype", "xfs", "filesystem (ext4 grows online only where the plugin has CAP_SYS_RESOURCE)")
	workDir := fs.String("workdir", "/tmp/rookzmq-demo", "where staging and target paths are made")
	eventsDir := fs.String("events-dir", "", "the driver's --events-dir: also ask for a write acknowledgement (flush -> ack event)")
	volType := fs.String("type", "rbd", "rbd, or cephfs: one shared volume published at two target paths at once")
	fsName := fs.String("fs-name", "cephfs", "CephFS file system (--type=cephfs)")
	adminUser := fs.String("admin-user", "", "cephx user that provisions (the adminID secret; --type=cephfs)")
	adminKeyFile := fs.String("admin-keyfile", "", "file holding that user's key (the adminKey secret; --type=cephfs)")
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		return 0
	} else if err != nil {
		return 2
	}
	key, err := os.ReadFile(*keyFile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: reading --keyfile: %v\n", err)
		return 2
	}
	d := &demo{secrets: map[string]string{"userID": *user, "userKey": strings.TrimSpace(string(key))}, eventsDir: *eventsDir}
	run := func() error { return d.run(*endpoint, *clusterID, *pool, *mounter, *fsType, *workDir) }
	switch *volType {
	case "rbd":
	case "cephfs":
		adminKey, err := os.ReadFile(*adminKeyFile)
		if err != nil || *adminUser == "" {
			fmt.Fprintf(os.Stderr, "demo: --type=cephfs needs --admin-user and --admin-keyfile (%v)\n", err)
			return 2
		}
		d.adminSecrets = map[string]string{"adminID": *adminUser, "adminKey": strings.TrimSpace(string(adminKey))}
		fsMounter := "" // the node's default, unless --mounter says otherwise
		fs.Visit(func(f *flag.Flag) {
			if f.Name == "mounter" {
				fsMounter = *mounter
			}
		})
		run = func() error { return d.runCephFS(*endpoint, *clusterID, *fsName, fsMounter, *workDir) }
	default:
		fmt.Fprintf(os.Stderr, "demo: --type=%s: rbd or cephfs\n", *volType)
		return 2
	}
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "demo FAILED: %v\n", err)
		return 1
	}
	fmt.Printf("demo passed in %s\n", time.Since(d.start).Round(time.Millisecond))
	return 0
}

type demo struct {
	secrets map[string]string
	// adminSecrets provision CephFS volumes (adminID/adminKey).
	adminSecrets map[string]string
	eventsDir    string
	note         string // printed under the current step's line
	start        time.Time
	step         int
}

// do runs one step and prints its duration.
func (d *demo) do(what string, f func() error) error {
	d.step++
	t := time.Now()
	err := f()
	mark := "ok"
	if err != nil {
		mark = "FAILED"
	}
	fmt.Printf("%2d. %-46s %-6s %8s\n", d.step, what, mark, time.Since(t).Round(100*time.Microsecond))
	if d.note != "" {
		fmt.Printf("    %s\n", d.note)
		d.note = ""
	}
	return err
}

func (d *demo) run(endpoint, clusterID, pool, mounter, fsType, workDir string) error {
	d.start = time.Now()
	target := strings.TrimPrefix(endpoint, "unix://")
	conn, err := grpc.NewClient("unix://"+target, grpc.WithTransportCredentials(insecure.NewCredentials()))
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
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	name := fmt.Sprintf("demo-%d", time.Now().UnixNano())
	var vol *csi.Volume
	if err := d.do("CreateVolume (512 MiB)", func() error {
		r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 512 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{capability}, Secrets: d.secrets,
			Parameters: map[string]string{"clusterID": clusterID, "pool": pool, "mounter": mounter},
		})
		vol = r.GetVolume()
		return err
	}); err != nil {
		return err
	}
	fmt.Printf("    volume %s\n", vol.GetVolumeId())
	id := vol.GetVolumeId()
	staging := filepath.Join(workDir, "staging", name)
	pubTarget := filepath.Join(workDir, "target", name)
	cleanup := func() { // best effort, so a failed demo leaves nothing behind
		c, cc := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cc()
		node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: pubTarget})
		node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: d.secrets})
	}
	steps := []struct {
		what string
		f    func() error
	}{
		{"NodeStageVolume (map, mkfs, mount)", func() error {
			if err := os.MkdirAll(staging, 0o750); err != nil {
				return err
			}
			_, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
				VolumeCapability: capability, VolumeContext: vol.GetVolumeContext(), Secrets: d.secrets})
			return err
		}},
		{"NodePublishVolume (bind mount)", func() error {
			_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
				TargetPath: pubTarget, VolumeCapability: capability, VolumeContext: vol.GetVolumeContext()})
			return err
		}},
		{"write a file (fsync)", func() error { return writeFile(filepath.Join(pubTarget, "hello.txt")) }},
		{"read it back", func() error { return checkFile(filepath.Join(pubTarget, "hello.txt")) }},
		{"flush over ZeroMQ (write acknowledged by Ceph)", func() error { return d.flush(id) }},
		{"ControllerExpandVolume (to 1 GiB)", func() error {
			r, err := ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}, VolumeCapability: capability, Secrets: d.secrets})
			if err == nil && !r.GetNodeExpansionRequired() {
				err = fmt.Errorf("filesystem volume did not ask for node expansion")
			}
			return err
		}},
		{"NodeExpandVolume (grow the filesystem)", func() error {
			r, err := node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: pubTarget,
				StagingTargetPath: staging, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}, VolumeCapability: capability})
			if err == nil && r.GetCapacityBytes() < 1<<30 {
				err = fmt.Errorf("device is %d bytes after expansion", r.GetCapacityBytes())
			}
			return err
		}},
		{"NodeGetVolumeStats", func() error {
			r, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: pubTarget})
			if err == nil {
				total := r.GetUsage()[0].GetTotal()
				d.note = fmt.Sprintf("filesystem: %d MiB total, %d MiB used", total>>20, r.GetUsage()[0].GetUsed()>>20)
				if total < 900<<20 {
					err = fmt.Errorf("filesystem did not grow: %d bytes", total)
				}
			}
			return err
		}},
		{"read the file again after expansion", func() error { return checkFile(filepath.Join(pubTarget, "hello.txt")) }},
		{"NodeUnpublishVolume", func() error {
			_, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: pubTarget})
			return err
		}},
		{"NodeUnstageVolume (sync, unmount, unmap)", func() error {
			_, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
			return err
		}},
		{"DeleteVolume", func() error {
			_, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: d.secrets})
			return err
		}},
	}
	for _, s := range steps {
		if err := d.do(s.what, s.f); err != nil {
			cleanup()
			return fmt.Errorf("%s: %w", s.what, err)
		}
	}
	os.Remove(staging)
	return nil
}

var demoContent = []byte("hello from rookzmq: this line went through the filesystem, a loop device, rbd-fuse and librbd\n")

func writeFile(path string) error { return writeData(path, demoContent) }

func checkFile(path string) error { return checkData(path, demoContent) }

// writeData writes content to a new file at path and fsyncs it.
func writeData(path string, content []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.Write(content); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// checkData reads path back and compares it with content.
func checkData(path string, content []byte) error {
	got, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, content) {
		return fmt.Errorf("read back %q, wrote %q", got, content)
	}
	return nil
}

// flush asks the node's event bridge for a write acknowledgement.
func (d *demo) flush(volumeID string) error {
	if d.eventsDir == "" {
		d.note = "(skipped: no --events-dir)"
		return nil
	}
	c, err := zmqbridge.Dial("ipc://"+filepath.Join(d.eventsDir, "events.sock"), "ipc://"+filepath.Join(d.eventsDir, "control.sock"))
	if err != nil {
		return err
	}
	defer c.Close()
	c.Timeout = time.Minute
	seq, ms, err := c.Flush(volumeID, "", "")
	if err == nil {
		d.note = fmt.Sprintf("ack event seq %d, flush took %.3f ms", seq, ms)
	}
	return err
}
