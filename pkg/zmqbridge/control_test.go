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
		`{"op":"replay","volume_id":"v"}`:      "unknown field",
		`{"OP":"replay"}`:                      "missing op",
		`{"op":"replay","since":null}`:         "must be a number",
		`{"op":"replay","since":1.5}`:          "integer",
		`{"op":"flush","volume_id":3}`:         "must be a string",
		`{"op":"replay"}]`:                     "more than one value",
		`null`:                                 "not an object",
		`{"op":"flush"}`:                       "needs volume_id",
		`{"op":"flush","pvc":"x"}`:             "needs volume_id",
		`{"op":"replay","since":-1}`:           "negative",
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
	for _, in := range requestCorpus {
		f.Add([]byte(in))
	}
	request := schemas(f)("request")
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		// The schema accepts exactly what the bridge accepts (the size
		// limit aside, which the schema does not express).
		if verr := validate(request, b); (err == nil) != (verr == nil) && len(b) <= maxRequestBytes {
			t.Fatalf("%q: the bridge says %v, the schema says %v", b, err, verr)
		}
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
