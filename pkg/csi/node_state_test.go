package csi

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// Saving a stage record fsyncs its directory after the rename; removing it
// fsyncs the directory after the unlink (seen with strace on a child).
func TestStateStoreSyncsDirectory(t *testing.T) {
	if dir := os.Getenv("ROOKZMQ_STATE_CHILD"); dir != "" {
		s := stateStore[struct{}]{dir: dir}
		if err := s.save(&StageRecord[struct{}]{VolumeID: "v"}); err != nil {
			t.Fatal(err)
		}
		if err := s.remove("v"); err != nil {
			t.Fatal(err)
		}
		return
	}
	if _, err := exec.LookPath("strace"); err != nil {
		t.Skip("strace is not installed")
	}
	dir := t.TempDir()
	trace := filepath.Join(dir, "trace")
	cmd := exec.Command("strace", "-f", "-qq", "-o", trace, "-e", "trace=openat,rename,renameat,renameat2,unlink,unlinkat,fsync",
		os.Args[0], "-test.run", "^TestStateStoreSyncsDirectory$")
	cmd.Env = append(os.Environ(), "ROOKZMQ_STATE_CHILD="+filepath.Join(dir, "state"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	b, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	volumes := filepath.Join(dir, "state", "volumes")
	// Calls in order, with directory fds resolved from their openat.
	fds := map[string]string{}
	var events []string
	openRe := regexp.MustCompile(`openat\(AT_FDCWD, "([^"]+)", [^)]*\) = (\d+)`)
	for _, l := range strings.Split(string(b), "\n") {
		switch {
		case openRe.MatchString(l):
			m := openRe.FindStringSubmatch(l)
			fds[m[2]] = m[1]
		case strings.Contains(l, "rename") && strings.Contains(l, volumes) && !strings.Contains(l, "= -1"):
			events = append(events, "rename")
		case strings.Contains(l, "unlink") && strings.Contains(l, ".json") && strings.Contains(l, volumes) && !strings.Contains(l, "= -1"):
			events = append(events, "unlink")
		case strings.Contains(l, "fsync("):
			if fd := strings.SplitN(l[strings.Index(l, "fsync(")+6:], ")", 2)[0]; fds[fd] == volumes {
				events = append(events, "fsync-dir")
			}
		}
	}
	got := strings.Join(events, " ")
	if !regexp.MustCompile(`rename fsync-dir.*unlink fsync-dir`).MatchString(got) {
		t.Fatalf("stage record calls %q, want the directory fsynced after the rename and after the unlink\n%s", got, b)
	}
}

// An attachment is stored beside the record's fields: one that would
// overwrite a field, or that is no JSON object, is refused, never written.
func TestStageRecordAttachmentFields(t *testing.T) {
	type clash struct {
		Staged string `json:"staged"`
	}
	if _, err := json.Marshal(StageRecord[clash]{VolumeID: "v"}); err == nil || !strings.Contains(err.Error(), `"staged" clashes`) {
		t.Fatalf("attachment with a record field's name: %v", err)
	}
	if _, err := json.Marshal(StageRecord[string]{VolumeID: "v", Attachment: "x"}); err == nil {
		t.Fatal("an attachment that is no JSON object was written")
	}
	type att struct {
		Daemon int `json:"daemon"`
	}
	b, err := json.Marshal(StageRecord[att]{VolumeID: "v", Staged: true, Attachment: att{Daemon: 7}, WorkDir: "/x"})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"accessMode":"","block":false,"daemon":7,"readOnly":false,"staged":true,"stagingPath":"","volumeID":"v"}`; string(b) != want {
		t.Fatalf("record %s, want %s", b, want)
	}
	var back StageRecord[att]
	if err := json.Unmarshal(b, &back); err != nil || back.Attachment.Daemon != 7 || !back.Staged || back.WorkDir != "" {
		t.Fatalf("read back %+v %v", back, err)
	}
}
