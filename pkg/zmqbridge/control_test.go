package zmqbridge

import (
	"strings"
	"testing"
)

func TestParseRequest(t *testing.T) {
	r, err := ParseRequest([]byte(`{"op":"replay","since":5}`))
	if err != nil || r.Since != 5 || r.Max != MaxReplay {
		t.Fatalf("%+v %v", r, err)
	}
	r, err = ParseRequest([]byte(`{"op":"flush","pvc":"data","namespace":"a"}`))
	if err != nil || r.PVC != "data" {
		t.Fatalf("%+v %v", r, err)
	}
	for in, want := range map[string]string{
		`not json`:                             "bad JSON",
		`{"op":"replay"} {}`:                   "more than one value",
		`{}`:                                   "missing op",
		`{"op":"rm -rf"}`:                      "unknown op",
		`{"op":"replay","max":-1}`:             "negative",
		`{"op":"replay","bogus":1}`:            "unknown field",
		`{"op":"flush"}`:                       "needs volume_id",
		`{"op":"flush","pvc":"x"}`:             "needs volume_id",
		`{"op":"replay","since":-1}`:           "bad JSON",
		`"` + strings.Repeat("a", 70000) + `"`: "exceeds",
	} {
		if _, err := ParseRequest([]byte(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseRequest(%.40s) = %v, want %q", in, err, want)
		}
	}
}

func FuzzParseRequest(f *testing.F) {
	f.Add([]byte(`{"op":"replay","since":1,"max":10}`))
	f.Add([]byte(`{"op":"flush","volume_id":"v"}`))
	f.Add([]byte(`{"op":"flush","pvc":"p","namespace":"n"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err != nil {
			return
		}
		switch r.Op {
		case "replay":
			if r.Max <= 0 || r.Max > MaxReplay {
				t.Fatalf("accepted max %d", r.Max)
			}
		case "flush":
			if r.VolumeID == "" && (r.PVC == "" || r.Namespace == "") {
				t.Fatalf("accepted a flush of nothing: %+v", r)
			}
		default:
			t.Fatalf("accepted op %q", r.Op)
		}
	})
}
