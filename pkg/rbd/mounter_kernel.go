package rbd

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"k8s.io/klog/v2"
)

// cliMounter maps images with a CLI that hands the image to a kernel driver:
// `rbd map` for krbd, `rbd-nbd map` for rbd-nbd. Only the key file (0600,
// removed right after) carries the key; the command line names its path.
type cliMounter struct {
	name   string // MounterKRBD or MounterNBD
	binary string // rbd or rbd-nbd
	module string // kernel module the mapping needs
	sysfs  string // present when the module is loaded
	keyDir string
}

func newKRBD(keyDir string) *cliMounter {
	return &cliMounter{name: MounterKRBD, binary: "rbd", module: "rbd", sysfs: "/sys/bus/rbd", keyDir: keyDir}
}

func newNBD(keyDir string) *cliMounter {
	return &cliMounter{name: MounterNBD, binary: "rbd-nbd", module: "nbd", sysfs: "/sys/module/nbd", keyDir: keyDir}
}

func (c *cliMounter) Name() string { return c.name }

// Available loads the kernel module if needed; without it the mounter cannot work.
func (c *cliMounter) Available() error {
	if _, err := exec.LookPath(c.binary); err != nil {
		return fmt.Errorf("%s is not installed on this node", c.binary)
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

func (c *cliMounter) imageArg(spec ImageSpec) string {
	if spec.Namespace != "" {
		return spec.Pool + "/" + spec.Namespace + "/" + spec.Image
	}
	return spec.Pool + "/" + spec.Image
}

func (c *cliMounter) Map(ctx context.Context, spec ImageSpec, workDir string) (Mapping, error) {
	m := Mapping{Mounter: c.name, Pool: spec.Pool, Namespace: spec.Namespace, Image: spec.Image}
	if dev := c.mapped(ctx, spec); dev != "" {
		m.Device = dev // a retry: already mapped
		return m, nil
	}
	keyFile, err := spec.Creds.WriteKeyFile(c.keyDir)
	if err != nil {
		return m, err
	}
	defer os.Remove(keyFile)
	args := []string{"map", c.imageArg(spec), "--id", spec.Creds.ID, "--keyfile", keyFile, "-m", spec.Monitors, "--no-mon-config", "--client-mount-timeout=30"}
	if spec.ReadOnly {
		args = append(args, "--read-only")
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, c.binary, args...)
	cmd.Env = toolEnv()
	out, err := cmd.Output()
	if err != nil {
		return m, fmt.Errorf("%s map %s: %v: %s", c.binary, c.imageArg(spec), err, spec.Creds.Redact(stderrOf(err)))
	}
	m.Device = strings.TrimSpace(string(out))
	klog.V(3).InfoS("image mapped", "mounter", c.name, "image", c.imageArg(spec), "device", m.Device, "duration", time.Since(start))
	return m, nil
}

// mapped returns the device an image is already mapped to, or "".
func (c *cliMounter) mapped(ctx context.Context, spec ImageSpec) string {
	cmd := exec.CommandContext(ctx, c.binary, "device", "list", "--format", "json")
	if c.binary == "rbd-nbd" {
		cmd = exec.CommandContext(ctx, c.binary, "list-mapped", "--format", "json")
	}
	out, err := cmd.Output()
	if err != nil {
		return ""
	}
	return findMapped(out, spec)
}

// Unmap unmaps the device the image is mapped at now (after a crash or a
// reboot the recorded path may name another image's device).
func (c *cliMounter) Unmap(ctx context.Context, m Mapping) error {
	dev := c.mapped(ctx, m.spec())
	if dev == "" {
		return nil // not mapped (any more)
	}
	out, err := exec.CommandContext(ctx, c.binary, "unmap", dev).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "not mapped") && !strings.Contains(string(out), "No such") {
		return fmt.Errorf("%s unmap %s: %v: %s", c.binary, dev, err, lastLine(out))
	}
	return nil
}

// Refresh is automatic: krbd and rbd-nbd follow the image's size.
func (c *cliMounter) Refresh(context.Context, Mapping, int64) error { return nil }

func (c *cliMounter) Check(m Mapping) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	switch dev := c.mapped(ctx, m.spec()); {
	case dev == "":
		return fmt.Errorf("image %s/%s is no longer mapped", m.Pool, m.Image)
	case dev != m.Device:
		return fmt.Errorf("image %s/%s is mapped at %s, not %s", m.Pool, m.Image, dev, m.Device)
	}
	return nil
}

func stderrOf(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return lastLine(ee.Stderr)
	}
	return ""
}
