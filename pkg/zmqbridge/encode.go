package zmqbridge

import (
	"strconv"
	"time"
	"unicode/utf8"
)

// appendJSON encodes the event exactly as encoding/json would (same field
// order, omitempty rules and string escaping) without reflection: the bridge
// encodes every event on the caller's goroutine, so this is its hot path.
// TestAppendJSONMatchesEncodingJSON and FuzzAppendJSON hold it to that.
// A zero now writes e.Time; otherwise an empty e.Time is written as now (UTC,
// RFC 3339 with nanoseconds), formatted straight into b.
func (e *Event) appendJSON(b []byte, now time.Time) []byte {
	b = append(b, `{"v":`...)
	b = strconv.AppendInt(b, int64(e.V), 10)
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, e.Seq, 10)
	b = appendField(b, "epoch", e.Epoch, true)
	if e.Time == "" && !now.IsZero() {
		b = append(b, `,"time":"`...)
		b = append(now.UTC().AppendFormat(b, time.RFC3339Nano), '"')
	} else {
		b = appendField(b, "time", e.Time, false)
	}
	b = appendField(b, "node", e.Node, false)
	b = appendField(b, "kind", e.Kind, false)
	for _, f := range [...]struct{ k, v string }{
		{"volume_id", e.VolumeID}, {"driver", e.Driver}, {"pvc", e.PVC}, {"namespace", e.Namespace}, {"pv", e.PV},
		{"pod", e.Pod}, {"pod_namespace", e.PodNamespace}, {"pod_uid", e.PodUID},
		{"access_type", e.AccessType}, {"fs_type", e.FsType},
	} {
		b = appendField(b, f.k, f.v, true)
	}
	if e.ReadOnly != nil {
		b = append(b, `,"read_only":`...)
		b = strconv.AppendBool(b, *e.ReadOnly)
	}
	if e.SizeBytes != 0 {
		b = append(b, `,"size_bytes":`...)
		b = strconv.AppendInt(b, e.SizeBytes, 10)
	}
	if e.FlushMs != nil {
		b = append(b, `,"flush_ms":`...)
		b = appendFloat(b, *e.FlushMs)
	}
	if e.Flushed != nil {
		b = append(b, `,"flushed":`...)
		b = strconv.AppendBool(b, *e.Flushed)
	}
	b = appendField(b, "trigger", e.Trigger, true)
	return append(b, '}')
}

func appendField(b []byte, key, val string, omitEmpty bool) []byte {
	if omitEmpty && val == "" {
		return b
	}
	b = append(b, ',', '"')
	b = append(b, key...)
	b = append(b, '"', ':')
	return appendString(b, val)
}

// appendFloat formats like encoding/json: 'f' within [1e-6, 1e21), else 'e'
// with a two-digit exponent cleaned of its leading zero.
func appendFloat(b []byte, f float64) []byte {
	abs := f
	if abs < 0 {
		abs = -abs
	}
	format := byte('f')
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		// clean up e-09 to e-9
		n := len(b)
		if n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b
}

const hexDigits = "0123456789abcdef"

// appendString quotes s as encoding/json does (HTML-safe escaping included).
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
