package zmqbridge

import "sync"

// tailSize is how many recent records the bridge keeps in memory.
const tailSize = 1 << 12

// tail holds the most recent records by sequence number, so the publisher
// sends them from memory instead of reading them back from the journal (it
// falls back to the journal for anything that has left the ring).
type tail struct {
	mu   sync.Mutex
	ring [tailSize]Record
}

func (t *tail) put(r Record) {
	t.mu.Lock()
	t.ring[r.Seq%tailSize] = r
	t.mu.Unlock()
}

// get appends to out the records after `after` up to `through`, in order,
// stopping at the first one the ring no longer (or not yet) holds.
func (t *tail) get(after, through uint64, out []Record) []Record {
	t.mu.Lock()
	defer t.mu.Unlock()
	for s := after + 1; s <= through; s++ {
		r := t.ring[s%tailSize]
		if r.Seq != s {
			break
		}
		out = append(out, r)
	}
	return out
}

// rewind forgets the records after seq (a journal repair gives their seqs
// again).
func (t *tail) rewind(seq uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i := range t.ring {
		if t.ring[i].Seq > seq {
			t.ring[i] = Record{}
		}
	}
}
