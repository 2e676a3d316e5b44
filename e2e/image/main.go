// Command image assembles a container image from root file system
// directories, one layer each, and writes it as a docker-save tarball
// (`docker load`, `kind load image-archive` and `ctr images import` take it).
// It needs neither Docker nor a registry: github.com/google/go-containerregistry
// writes the layers, config and manifests.
//
//	image -o out.tar -tag rookzmq:v1 -dir rootfs [-dir more] [-entrypoint /bin/x] [-env K=V]
package main

import (
	"archive/tar"
	"compress/gzip"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var dirs, env, entrypoint, cmd list
	out := flag.String("o", "", "output tarball (docker-save format)")
	tag := flag.String("tag", "", "image reference, e.g. rookzmq:v1")
	workdir := flag.String("workdir", "", "working directory")
	flag.Var(&dirs, "dir", "root file system directory: one layer each, in order (repeatable)")
	flag.Var(&env, "env", "KEY=VALUE in the image config (repeatable)")
	flag.Var(&entrypoint, "entrypoint", "entrypoint argument (repeatable)")
	flag.Var(&cmd, "cmd", "default command argument (repeatable)")
	flag.Parse()
	if *out == "" || *tag == "" || len(dirs) == 0 {
		fmt.Fprintln(os.Stderr, "usage: image -o OUT.tar -tag NAME:TAG -dir ROOTFS [-dir ...] [-entrypoint ARG]... [-env K=V]...")
		os.Exit(2)
	}
	if err := build(*out, *tag, *workdir, dirs, env, entrypoint, cmd); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func build(out, tag, workdir string, dirs, env, entrypoint, cmd []string) error {
	start := time.Now()
	ref, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("tag %q: %w", tag, err)
	}
	img := mutate.MediaType(empty.Image, types.DockerManifestSchema2)
	var layers []v1.Layer
	for _, d := range dirs {
		d := d
		if fi, err := os.Stat(d); err != nil || !fi.IsDir() {
			return fmt.Errorf("-dir %s: not a directory", d)
		}
		// Fastest gzip: on 2 cores the default level costs a minute per image
		// for a few percent of size.
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			r, w := io.Pipe()
			go func() { w.CloseWithError(writeTar(w, d)) }()
			return r, nil
		}, tarball.WithCompressionLevel(gzip.BestSpeed))
		if err != nil {
			return err
		}
		layers = append(layers, l)
	}
	if img, err = mutate.AppendLayers(img, layers...); err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Created = v1.Time{Time: time.Now().UTC()}
	cf.Config.Entrypoint, cf.Config.Cmd, cf.Config.WorkingDir = entrypoint, cmd, workdir
	cf.Config.Env = append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, env...)
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	if err := tarball.WriteToFile(out, ref, img); err != nil {
		return fmt.Errorf("writing %s: %w", out, err)
	}
	var compressed, uncompressed int64
	for _, l := range layers {
		c, err := l.Size()
		if err != nil {
			return err
		}
		compressed += c
		u, err := uncompressedSize(l)
		if err != nil {
			return err
		}
		uncompressed += u
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	fi, err := os.Stat(out)
	if err != nil {
		return err
	}
	fmt.Printf("image %s: %s, %d layer(s), %.1f MB compressed, %.1f MB unpacked, tarball %s %.1f MB, built in %s\n",
		ref, digest, len(layers), mb(compressed), mb(uncompressed), out, mb(fi.Size()), time.Since(start).Round(100*time.Millisecond))
	return nil
}

func mb(n int64) float64 { return float64(n) / 1e6 }

func uncompressedSize(l v1.Layer) (int64, error) {
	rc, err := l.Uncompressed()
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	return io.Copy(io.Discard, rc)
}

// writeTar writes the tree under root as a layer: owners, modes, symlinks and
// hard links kept; the contents of dev, proc and sys are left out (the
// runtime provides them), as are sockets and named pipes.
func writeTar(w io.Writer, root string) error {
	tw := tar.NewWriter(w)
	seen := map[[2]uint64]string{} // (dev, inode) -> first path, for hard links
	err := filepath.WalkDir(root, func(path string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil || rel == "." {
			return err
		}
		rel = filepath.ToSlash(rel)
		fi, err := os.Lstat(path)
		if err != nil {
			return err
		}
		for _, skip := range []string{"dev/", "proc/", "sys/"} {
			if strings.HasPrefix(rel, skip) {
				if fi.IsDir() {
					return filepath.SkipDir
				}
				return nil
			}
		}
		mode := fi.Mode()
		if mode&(fs.ModeSocket|fs.ModeNamedPipe|fs.ModeDevice|fs.ModeCharDevice) != 0 {
			return nil
		}
		link := ""
		if mode&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(path); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		hdr.Name = rel
		if fi.IsDir() {
			hdr.Name += "/"
		}
		hdr.Format = tar.FormatPAX
		hdr.Uname, hdr.Gname = "", ""
		hdr.ModTime = fi.ModTime().Truncate(time.Second)
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		st := fi.Sys().(*syscall.Stat_t)
		hdr.Uid, hdr.Gid = int(st.Uid), int(st.Gid)
		if mode.IsRegular() && st.Nlink > 1 {
			key := [2]uint64{uint64(st.Dev), st.Ino}
			if first, ok := seen[key]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
				return tw.WriteHeader(hdr)
			}
			seen[key] = rel
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if !mode.IsRegular() {
			return nil
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(tw, f)
		return err
	})
	if err != nil {
		return err
	}
	return tw.Close()
}
