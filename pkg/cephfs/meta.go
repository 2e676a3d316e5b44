package cephfs

import (
	"sort"
	"strings"
)

// parseMeta reads the INI format Python's configparser writes for .meta:
// [SECTION] headers and "key = value" lines. Keys are lower-cased, as
// configparser does; lines it would treat as continuations or comments are
// skipped (nothing the volumes module writes has them).
func parseMeta(s string) map[string]map[string]string {
	out := map[string]map[string]string{}
	var cur map[string]string
	for _, line := range strings.Split(s, "\n") {
		t := strings.TrimSpace(line)
		switch {
		case t == "" || t[0] == '#' || t[0] == ';':
		case t[0] == '[' && t[len(t)-1] == ']':
			name := t[1 : len(t)-1]
			if out[name] == nil {
				out[name] = map[string]string{}
			}
			cur = out[name]
		case cur != nil && line[0] != ' ' && line[0] != '\t':
			i := strings.IndexAny(t, "=:")
			if i < 0 {
				continue
			}
			cur[strings.ToLower(strings.TrimSpace(t[:i]))] = strings.TrimSpace(t[i+1:])
		}
	}
	return out
}

// formatMeta writes sections as configparser does: GLOBAL first, keys in a
// stable order, "key = value", a blank line after each section.
func formatMeta(meta map[string]map[string]string) string {
	var b strings.Builder
	names := make([]string, 0, len(meta))
	for n := range meta {
		if n != metaGlobal {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	if _, ok := meta[metaGlobal]; ok {
		names = append([]string{metaGlobal}, names...)
	}
	for _, n := range names {
		sec := meta[n]
		if len(sec) == 0 {
			continue // configparser's flush culls empty sections
		}
		b.WriteString("[" + n + "]\n")
		keys := make([]string, 0, len(sec))
		for k := range sec {
			keys = append(keys, k)
		}
		if n == metaGlobal {
			keys = globalOrder(keys)
		} else {
			sort.Strings(keys)
		}
		for _, k := range keys {
			b.WriteString(strings.ToLower(k) + " = " + sec[k] + "\n")
		}
		b.WriteString("\n")
	}
	return b.String()
}

// globalOrder puts the keys the mgr writes first in its order.
func globalOrder(keys []string) []string {
	rank := map[string]int{"version": 1, "type": 2, "path": 3, "state": 4}
	sort.Slice(keys, func(i, j int) bool {
		ri, rj := rank[keys[i]], rank[keys[j]]
		if ri == 0 {
			ri = 100
		}
		if rj == 0 {
			rj = 100
		}
		if ri != rj {
			return ri < rj
		}
		return keys[i] < keys[j]
	})
	return keys
}
