package rbd

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Tool timeouts: a listing answers at once unless something is wrong; a map
// waits for the cluster.
const (
	listTimeout  = 10 * time.Second
	mapTimeout   = 2 * time.Minute
	unmapTimeout = time.Minute
)

// cliMounter maps images with `rbd device map`, which hands the image to a
// kernel driver: krbd, or nbd (served by an rbd-nbd process that rbd starts).
// The key reaches the tool as a memfd; no image name is ever a positional
// argument.
type cliMounter struct {
	name    string // MounterKRBD or MounterNBD
	devType string // rbd device --device-type
	tools   []string
	module  string // kernel module the mapping needs
	sysfs   string // present when the module is loaded
	// tmpfsKeys: see rcsi.Tool. rbd reads the key itself for krbd (memfd);
	// for nbd it runs rbd-nbd with every descriptor but 0-2 closed, so the
	// key goes to a short-lived file on tmpfs.
	tmpfsKeys string
}

func newKRBD() *cliMounter {
	return &cliMounter{name: MounterKRBD, devType: "krbd", tools: []string{"rbd"}, module: "rbd", sysfs: "/sys/bus/rbd"}
}

func newNBD(tmpfsKeys string) *cliMounter {
	return &cliMounter{name: MounterNBD, devType: "nbd", tools: []string{"rbd", "rbd-nbd"}, module: "nbd", sysfs: "/sys/module/nbd", tmpfsKeys: tmpfsKeys}
}

func (c *cliMounter) Name() string { return c.name }

// Available loads the kernel module if needed; without it the mounter cannot work.
func (c *cliMounter) Available() error {
	for _, t := range c.tools {
		if _, err := exec.LookPath(t); err != nil {
			return fmt.Errorf("%s is not installed on this node", t)
		}
	}
	if _, err := os.Stat(c.sysfs); err == nil {
		return nil
	}
	out, err := exec.Command("modprobe", c.module).CombinedOutput()
	if _, serr := os.Stat(c.sysfs); serr == nil {
		return nil
	}
	reason := strings.TrimSpace(string(out))
	if err != nil && reason == "" {
		reason = err.Error()
	}
	return fmt.Errorf("the %s kernel module is not available on this node (modprobe %s: %s)", c.module, c.module, reason)
}

func imageName(spec ImageSpec) string {
	if spec.Namespace != "" {
		return spec.Pool + "/" + spec.Namespace + "/" + spec.Image
	}
	return spec.Pool + "/" + spec.Image
}

// mapArgs is the `rbd device map` command line: the image by --pool,
// --namespace and --image (never a positional spec), the key by memfd.
func (c *cliMounter) mapArgs(spec ImageSpec) []string {
	args := []string{"device", "map", "--device-type=" + c.devType,
		"--pool=" + spec.Pool, "--image=" + spec.Image,
		"--id=" + spec.Creds.ID, rcsi.KeyFileArg, "--mon-host=" + spec.Monitors,
		"--no-mon-config", "--client-mount-timeout=30"}
	if spec.Namespace != "" {
		args = append(args, "--namespace="+spec.Namespace)
	}
	args = append(args, rcsi.QuietArgs...)
	if spec.ReadOnly {
		args = append(args, "--read-only")
	}
	return args
}

func (c *cliMounter) Map(ctx context.Context, spec ImageSpec, workDir string) (Mapping, error) {
	m := Mapping{Mounter: c.name, Pool: spec.Pool, Namespace: spec.Namespace, Image: spec.Image}
	dev, err := c.mapped(ctx, spec)
	if err != nil {
		return m, err // never map a second time because the listing failed
	}
	if dev != "" {
		m.Device = dev // a retry: already mapped
		return m, nil
	}
	start := time.Now()
	out, err := rcsi.Tool{Name: "rbd", Args: c.mapArgs(spec), Creds: &spec.Creds, Timeout: mapTimeout, TmpfsKeys: c.tmpfsKeys}.Run(ctx)
	if err != nil {
		return m, fmt.Errorf("mapping %s: %w", imageName(spec), err)
	}
	m.Device = strings.TrimSpace(string(out))
	klog.V(3).InfoS("image mapped", "mounter", c.name, "image", imageName(spec), "device", m.Device, "duration", time.Since(start))
	return m, nil
}

// mapped returns the device an image is mapped at ("" if a successful
// listing does not show it); a listing that fails or times out is an error.
func (c *cliMounter) mapped(ctx context.Context, spec ImageSpec) (string, error) {
	args := append([]string{"device", "list", "--device-type=" + c.devType, "--format=json"}, rcsi.QuietArgs...)
	out, err := rcsi.Tool{Name: "rbd", Args: args, Timeout: listTimeout}.Run(ctx)
	if err != nil {
		return "", err
	}
	return findMapped(out, spec)
}

// Unmap unmaps the device the image is mapped at now (after a crash or a
// reboot the recorded path may name another image's device).
func (c *cliMounter) Unmap(ctx context.Context, m Mapping) error {
	dev, err := c.mapped(ctx, m.spec())
	if err != nil {
		return err
	}
	if dev == "" {
		return nil // a successful listing says it is not mapped (any more)
	}
	args := append([]string{"device", "unmap", "--device-type=" + c.devType, dev}, rcsi.QuietArgs...)
	if _, err := (rcsi.Tool{Name: "rbd", Args: args, Timeout: unmapTimeout}).Run(ctx); err != nil {
		// Gone meanwhile? Only a successful listing may say so.
		if now, lerr := c.mapped(ctx, m.spec()); lerr == nil && now == "" {
			return nil
		}
		return err
	}
	return nil
}

// Refresh is automatic: krbd and rbd-nbd follow the image's size.
func (c *cliMounter) Refresh(context.Context, Mapping, int64) error { return nil }

func (c *cliMounter) Check(ctx context.Context, m Mapping) error {
	switch dev, err := c.mapped(ctx, m.spec()); {
	case err != nil:
		return err
	case dev == "":
		return rcsi.Gone("image %s is no longer mapped", imageName(m.spec()))
	case dev != m.Device:
		return rcsi.Gone("image %s is mapped at %s, not %s", imageName(m.spec()), dev, m.Device)
	}
	return nil
}
