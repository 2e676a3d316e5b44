package zmqbridge

// Retention by class. With JournalOptions.Class and KeepPerClass set, the
// segments retention drops are not simply deleted: a keeper goroutine reads
// each one first and keeps, in the kept file, the newest KeepPerClass
// records of every class (the bridge: every namespace), so that one class
// writing a lot cannot push all of another's records out. For each class it
// remembers the highest seq it let go (lost), so a reader knows exactly from
// where a class's records are complete.

import (
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"time"

	"k8s.io/klog/v2"
)

const (
	keptFile = "kept.dat"
	// maxLostClasses bounds the classes whose lost seq is remembered; past
	// it the oldest are folded into the floor.
	maxLostClasses = 1024
	// maxKeptRead is the most records one Kept call returns.
	maxKeptRead = 1000
)

// keptRec is a record kept past its segment.
type keptRec struct {
	Record
	class string
	at    time.Time // its segment's newest record's time: it ages from then
}

func (r *keptRec) size() int64 { return int64(headerLen + payloadMin + len(r.Topic) + len(r.Data)) }

// keptSet is the kept records and what was let go; never changed once
// installed (the keeper builds a new one).
type keptSet struct {
	recs []keptRec // ascending seq, all <= through
	// lost is, per class, the highest seq of its records dropped and not
	// kept; every record up to floor is lost, whatever its class.
	lost  map[string]uint64
	floor uint64
	// through: the records up to through were accounted for (the end of the
	// last segment dropped). Records after it and before the first segment
	// were dropped without being kept (keeping was off, or the file lost).
	through uint64
}

// keeping reports whether retention keeps each class's newest records.
func (j *Journal) keeping() bool { return j.o.Class != nil && j.o.KeepPerClass > 0 }

// horizon is the highest seq at or below which records of a class sees
// accepts (nil: every class) may be gone.
func (k *keptSet) horizon(sees func(string) bool) uint64 {
	h := k.floor
	for c, s := range k.lost {
		if s > h && (sees == nil || sees(c)) {
			h = s
		}
	}
	return h
}

func (k *keptSet) clone() *keptSet {
	n := &keptSet{recs: slices.Clone(k.recs), lost: make(map[string]uint64, len(k.lost)), floor: k.floor, through: k.through}
	for c, s := range k.lost {
		n.lost[c] = s
	}
	return n
}

func (k *keptSet) lose(class string, seq uint64) {
	if seq > k.lost[class] {
		k.lost[class] = seq
	}
}

// dropThrough lets every record up to seq go (a segment that could not be
// read, or a kept file that was lost).
func (k *keptSet) dropThrough(seq uint64) {
	if seq <= k.floor {
		return
	}
	k.floor = seq
	i := sort.Search(len(k.recs), func(i int) bool { return k.recs[i].Seq > seq })
	k.recs = slices.Delete(k.recs, 0, i)
	for c, s := range k.lost {
		if s <= seq {
			delete(k.lost, c)
		}
	}
	k.through = max(k.through, seq)
}

// trim applies the limits: each class's newest KeepPerClass records, none
// older than MaxAge, at most KeepBytes in all (past that the class holding
// the most bytes lets its oldest go), and at most maxLostClasses lost seqs.
// It reports whether anything went.
func (k *keptSet) trim(o *JournalOptions, now time.Time) bool {
	n := len(k.recs)
	keep := make([]bool, len(k.recs))
	count := map[string]int{}
	per := map[string]int64{}
	var total int64
	for i := len(k.recs) - 1; i >= 0; i-- {
		r := &k.recs[i]
		if count[r.class] >= o.KeepPerClass || now.Sub(r.at) > o.MaxAge {
			k.lose(r.class, r.Seq)
			continue
		}
		count[r.class]++
		keep[i] = true
		per[r.class] += r.size()
		total += r.size()
	}
	next := map[string]int{} // per class: where to look for its oldest kept record
	for total > o.KeepBytes {
		var big string
		for c, b := range per {
			if b > per[big] || (b == per[big] && c < big) {
				big = c
			}
		}
		i := next[big]
		for !keep[i] || k.recs[i].class != big {
			i++
		}
		next[big] = i + 1
		keep[i] = false
		k.lose(big, k.recs[i].Seq)
		per[big] -= k.recs[i].size()
		total -= k.recs[i].size()
	}
	out := k.recs[:0]
	for i, r := range k.recs {
		if keep[i] {
			out = append(out, r)
		}
	}
	clear(k.recs[len(out):])
	k.recs = out
	if len(k.lost) > maxLostClasses {
		seqs := make([]uint64, 0, len(k.lost))
		for _, s := range k.lost {
			seqs = append(seqs, s)
		}
		slices.Sort(seqs)
		k.dropThrough(seqs[len(seqs)-maxLostClasses/2-1])
	}
	return len(k.recs) != n
}

// aged reports whether a kept record is older than maxAge.
func (k *keptSet) aged(now time.Time, maxAge time.Duration) bool {
	for _, r := range k.recs {
		if now.Sub(r.at) > maxAge {
			return true
		}
	}
	return false
}

// keptMeta is the kept file's first record.
type keptMeta struct {
	V       int               `json:"v"`
	Through uint64            `json:"through"`
	Floor   uint64            `json:"floor"`
	Lost    map[string]uint64 `json:"lost"`
	Times   []int64           `json:"times"` // each record's at, Unix nanoseconds
}

// encode is the kept file: a record with seq 0 holding keptMeta, then the
// kept records, in the segments' record format.
func (k *keptSet) encode() []byte {
	m := keptMeta{V: 1, Through: k.through, Floor: k.floor, Lost: k.lost, Times: make([]int64, len(k.recs))}
	for i, r := range k.recs {
		m.Times[i] = r.at.UnixNano()
	}
	meta, _ := json.Marshal(m)
	buf := encodeRecord(nil, 0, "kept", meta)
	for _, r := range k.recs {
		buf = encodeRecord(buf, r.Seq, r.Topic, r.Data)
	}
	return buf
}

// writeKept replaces the kept file: a temporary file, fsynced, renamed, and
// the directory fsynced, so it is whole and durable before any segment it
// stands for is deleted.
func writeKept(dir string, data []byte) error {
	tmp := filepath.Join(dir, keptFile+".tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = fileSync(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, keptFile))
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// loadKept reads the kept file for a journal whose segments start at first.
// A missing or damaged file keeps nothing: everything before first is lost.
func (j *Journal) loadKept(first uint64) *keptSet {
	k := &keptSet{lost: map[string]uint64{}}
	os.Remove(filepath.Join(j.o.Dir, keptFile+".tmp"))
	b, err := os.ReadFile(filepath.Join(j.o.Dir, keptFile))
	if err == nil {
		err = k.decode(b, j.o.Class)
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		klog.ErrorS(err, "event journal: the kept records cannot be read; every record before the first segment counts as lost",
			"dir", j.o.Dir, "firstSeq", first)
		k = &keptSet{lost: map[string]uint64{}}
	}
	k.normalize(first)
	return k
}

func (k *keptSet) decode(b []byte, class func(Record) string) error {
	var m keptMeta
	for off, i := 0, -1; off < len(b); i++ {
		if len(b)-off < headerLen {
			return errors.New("kept file: torn record")
		}
		n, crc := int(binary.LittleEndian.Uint32(b[off:])), binary.LittleEndian.Uint32(b[off+4:])
		if n > len(b)-off-headerLen {
			return errors.New("kept file: torn record")
		}
		r, ok := decodePayload(b[off+headerLen:off+headerLen+n], crc)
		if !ok {
			return fmt.Errorf("kept file: %w at offset %d", errCorrupt, off)
		}
		off += headerLen + n
		if i < 0 {
			if r.Seq != 0 || json.Unmarshal(r.Data, &m) != nil || m.V != 1 {
				return errors.New("kept file: bad header")
			}
			continue
		}
		if i >= len(m.Times) || (len(k.recs) > 0 && r.Seq <= k.recs[len(k.recs)-1].Seq) {
			return errors.New("kept file: records do not match its header")
		}
		k.recs = append(k.recs, keptRec{Record: r, class: class(r), at: time.Unix(0, m.Times[i])})
	}
	if len(k.recs) != len(m.Times) {
		return errors.New("kept file: records do not match its header")
	}
	k.through, k.floor = m.Through, m.Floor
	for c, s := range m.Lost {
		k.lost[c] = s
	}
	return nil
}

// normalize fits the kept set to segments starting at first after a crash:
// records the segments still hold are theirs (the keeper wrote the file but
// the segments were not deleted yet); a class's records let go among them
// are not lost after all, so its lost seq drops to first-1 (which may
// overstate, never understate, what is gone); and whatever before first was
// not accounted for is lost.
func (k *keptSet) normalize(first uint64) {
	if first == 0 {
		return
	}
	i := sort.Search(len(k.recs), func(i int) bool { return k.recs[i].Seq >= first })
	k.recs = k.recs[:i]
	for c, s := range k.lost {
		if s >= first {
			k.lost[c] = first - 1
		}
	}
	k.floor = min(k.floor, first-1)
	if k.through < first-1 {
		k.dropThrough(first - 1)
	}
	k.through = first - 1
}

// retainKeptLocked is retainLocked when keeping: it hands the oldest sealed
// segments past MaxBytes or MaxAge to the keeper instead of dropping them,
// and wakes it when kept records aged out.
func (j *Journal) retainKeptLocked(now time.Time) {
	total := j.total
	for _, s := range j.keepQueue {
		total -= s.size
	}
	for i := len(j.keepQueue); i < len(j.segs)-1; i++ {
		s := j.segs[i]
		if total <= j.o.MaxBytes && now.Sub(s.newest) <= j.o.MaxAge {
			break
		}
		j.keepQueue = append(j.keepQueue, s)
		total -= s.size
	}
	if len(j.keepQueue) > 0 || j.kept.aged(now, j.o.MaxAge) {
		select {
		case j.keepWake <- struct{}{}:
		default:
		}
	}
}

// keepLoop is the keeper: it turns the segments retention drops into kept
// records, off the journal's lock.
func (j *Journal) keepLoop() {
	defer close(j.keepDone)
	for {
		select {
		case <-j.keepWake:
		case <-j.keepStop:
			return
		}
		for j.keepOnce() {
			select {
			case <-j.keepStop:
				return
			default:
			}
		}
	}
}

// keepOnce reads the segments queued for dropping, keeps their newest
// records of each class, writes the kept file, then drops the segments (the
// committer deletes their files after a directory fsync). It reports whether
// more segments are queued.
func (j *Journal) keepOnce() bool {
	type view struct {
		segment
		end uint64
	}
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return false
	}
	var queue []view
	for i, s := range j.keepQueue {
		if i+1 >= len(j.segs) || j.segs[i] != s {
			break // a repair reloaded the segments: retention queues them again
		}
		queue = append(queue, view{*s, j.segs[i+1].first - 1})
	}
	old, now := j.kept, j.o.Now()
	if len(queue) == 0 && !old.aged(now, j.o.MaxAge) {
		j.keepQueue = nil
		j.mu.Unlock()
		return false
	}
	j.mu.Unlock()

	start := time.Now()
	k := old.clone()
	changed := len(queue) > 0
	for _, v := range queue {
		if err := j.keepSegment(k, &v.segment, v.end); err != nil {
			klog.ErrorS(err, "event journal retention: cannot read a dropped segment; its records count as lost", "segment", v.path)
			k.dropThrough(v.end)
		}
	}
	if k.trim(&j.o, now) {
		changed = true
	}
	if changed {
		if err := writeKept(j.o.Dir, k.encode()); err != nil {
			// The segments go anyway (the byte limit holds): a restart finds
			// the old file and counts everything before the first segment lost.
			klog.ErrorS(err, "event journal retention: cannot write the kept records", "dir", j.o.Dir)
		}
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	n := len(queue)
	if j.closed || n > len(j.keepQueue) || n >= len(j.segs) {
		return false
	}
	for i, v := range queue {
		if j.segs[i].first != v.first || j.keepQueue[i] != j.segs[i] {
			return false // a repair reloaded the segments meanwhile
		}
	}
	j.kept = k
	for _, s := range j.segs[:n] {
		j.total -= s.size
		j.drop = append(j.drop, s.path)
	}
	j.segs = slices.Delete(slices.Clone(j.segs), 0, n)
	j.keepQueue = slices.Delete(j.keepQueue, 0, n)
	if n > 0 {
		j.commitCond.Signal()
		klog.V(2).InfoS("event journal retention: segments dropped, newest records of each class kept",
			"segments", n, "firstSeq", j.segs[0].first, "kept", len(k.recs), "duration", time.Since(start))
	}
	return len(j.keepQueue) > 0
}

// keepSegment adds to k the newest KeepPerClass records of each class in the
// sealed segment s (whose last seq is end); the others it lets go.
func (j *Journal) keepSegment(k *keptSet, s *segment, end uint64) error {
	f, err := os.Open(s.path)
	if err != nil {
		return err
	}
	defer f.Close()
	rr := newRecordReader(f, 0, s.size, 1<<20)
	rings := map[string][]keptRec{}
	for seq := s.first; seq <= end; seq++ {
		n, crc, got, ok, err := rr.header()
		if err == nil && (!ok || got != seq) {
			err = fmt.Errorf("%w: record %d missing", errCorrupt, seq)
		}
		var r Record
		if err == nil {
			r, err = rr.body(n, crc)
		}
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return fmt.Errorf("record %d: %w", seq, err)
		}
		c := j.o.Class(r)
		ring := append(rings[c], keptRec{Record: r, class: c, at: s.newest})
		if len(ring) > j.o.KeepPerClass {
			k.lose(c, ring[0].Seq)
			ring = ring[1:]
		}
		rings[c] = ring
	}
	var add []keptRec
	for _, ring := range rings {
		add = append(add, ring...)
	}
	slices.SortFunc(add, func(a, b keptRec) int { return cmp.Compare(a.Seq, b.Seq) })
	k.recs = append(k.recs, add...)
	k.through = end
	return nil
}

// Kept returns, for a reader of the records before the first segment (see
// JournalOptions.KeepPerClass), the kept records after `after` of the
// classes sees accepts (nil: all), in order, at most 1,000; lost, the
// highest seq at or below which records of those classes may be gone (after
// < lost: they are); and first, the first seq the segments hold.
func (j *Journal) Kept(after uint64, sees func(class string) bool) (recs []Record, lost, first uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	first = j.segs[0].first
	k := j.kept
	lost = k.horizon(sees)
	if k.through+1 < first {
		lost = max(lost, first-1) // dropped without being kept
	}
	i := sort.Search(len(k.recs), func(i int) bool { return k.recs[i].Seq > after })
	for _, r := range k.recs[i:] {
		if r.Seq >= first || len(recs) == maxKeptRead {
			break
		}
		if sees == nil || sees(r.class) {
			recs = append(recs, r.Record)
		}
	}
	return recs, lost, first
}
