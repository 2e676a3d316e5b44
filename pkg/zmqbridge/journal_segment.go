package zmqbridge

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"k8s.io/klog/v2"
)

// On-disk record: 4-byte LE payload length, 4-byte LE CRC-32C of the payload,
// then the payload: 8-byte LE seq, 2-byte LE topic length, topic, data.
const (
	headerLen   = 8
	payloadMin  = 10
	maxTopicLen = 65535
	maxPayload  = 16 << 20
	indexStride = 32 << 10 // one sparse index entry per this many bytes
	segSuffix   = ".seg"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// fileSync is every full fsync the journal does (sealing, recovery,
// directories); the fuzz test stubs it for speed.
var fileSync = (*os.File).Sync

// fileWriteAt is every write of records the journal does; tests stub it to
// inject write errors.
var fileWriteAt = (*os.File).WriteAt

// errCorrupt is wrapped by Read when a record of a sealed segment fails its checks.
var errCorrupt = errors.New("journal record corrupt")

// idxEntry says the record with seq starts at off.
type idxEntry struct {
	seq uint64
	off int64
}

// segment is one segment file. Fields are guarded by Journal.mu.
type segment struct {
	first   uint64
	path    string
	size    int64
	newest  time.Time  // time of the newest record (file mtime once sealed)
	index   []idxEntry // sparse; valid only if indexed
	indexed bool
}

// segName returns the file name of the segment whose first record is first.
func segName(first uint64) string {
	return fmt.Sprintf("%020d%s", first, segSuffix)
}

// listSegments returns the segment files in dir, oldest first.
func listSegments(dir string) ([]*segment, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var segs []*segment
	for _, e := range ents {
		name := e.Name()
		num, ok := strings.CutSuffix(name, segSuffix)
		if !ok || len(num) != 20 || !e.Type().IsRegular() {
			continue
		}
		first, err := strconv.ParseUint(num, 10, 64)
		if err != nil || first == 0 {
			continue
		}
		segs = append(segs, &segment{first: first, path: filepath.Join(dir, name)})
	}
	sort.Slice(segs, func(a, b int) bool { return segs[a].first < segs[b].first })
	return segs, nil
}

// encodeRecord appends the encoded record to buf.
func encodeRecord(buf []byte, seq uint64, topic string, data []byte) []byte {
	n := payloadMin + len(topic) + len(data)
	start := len(buf)
	buf = binary.LittleEndian.AppendUint32(buf, uint32(n))
	buf = binary.LittleEndian.AppendUint32(buf, 0)
	buf = binary.LittleEndian.AppendUint64(buf, seq)
	buf = binary.LittleEndian.AppendUint16(buf, uint16(len(topic)))
	buf = append(buf, topic...)
	buf = append(buf, data...)
	crc := crc32.Checksum(buf[start+headerLen:], castagnoli)
	binary.LittleEndian.PutUint32(buf[start+4:], crc)
	return buf
}

// decodePayload checks a payload against its CRC and splits it. Data aliases p.
func decodePayload(p []byte, crc uint32) (Record, bool) {
	if len(p) < payloadMin || crc32.Checksum(p, castagnoli) != crc {
		return Record{}, false
	}
	tl := int(binary.LittleEndian.Uint16(p[8:]))
	if payloadMin+tl > len(p) {
		return Record{}, false
	}
	return Record{
		Seq:   binary.LittleEndian.Uint64(p),
		Topic: string(p[payloadMin : payloadMin+tl]),
		Data:  p[payloadMin+tl : len(p) : len(p)],
	}, true
}

// recordReader reads consecutive records of one segment from a byte offset.
type recordReader struct {
	r   *bufio.Reader
	off int64 // offset of the next record
	end int64
	hdr [headerLen + 8]byte
}

func newRecordReader(f io.ReaderAt, off, end int64, bufSize int) *recordReader {
	sr := io.NewSectionReader(f, off, end-off)
	bufSize = int(min(int64(bufSize), max(end-off, 16)))
	return &recordReader{r: bufio.NewReaderSize(sr, bufSize), off: off, end: end}
}

// header reads the next record's length, CRC and seq. ok is false at a clean
// end; err is non-nil when the bytes left cannot be a whole record.
func (rr *recordReader) header() (n int, crc uint32, seq uint64, ok bool, err error) {
	if rr.off == rr.end {
		return 0, 0, 0, false, nil
	}
	if rr.end-rr.off < headerLen+payloadMin {
		return 0, 0, 0, false, io.ErrUnexpectedEOF
	}
	if _, err := io.ReadFull(rr.r, rr.hdr[:]); err != nil {
		return 0, 0, 0, false, err
	}
	n = int(binary.LittleEndian.Uint32(rr.hdr[:]))
	if n < payloadMin || n > maxPayload || int64(n) > rr.end-rr.off-headerLen {
		return 0, 0, 0, false, errCorrupt
	}
	crc = binary.LittleEndian.Uint32(rr.hdr[4:])
	seq = binary.LittleEndian.Uint64(rr.hdr[headerLen:])
	return n, crc, seq, true, nil
}

// body reads the rest of the record whose header was just read and verifies it.
func (rr *recordReader) body(n int, crc uint32) (Record, error) {
	p := make([]byte, n)
	copy(p, rr.hdr[headerLen:])
	if _, err := io.ReadFull(rr.r, p[8:]); err != nil {
		return Record{}, err
	}
	rr.off += int64(headerLen + n)
	rec, ok := decodePayload(p, crc)
	if !ok {
		return Record{}, errCorrupt
	}
	return rec, nil
}

// skipBody discards the rest of the record whose header was just read.
func (rr *recordReader) skipBody(n int) error {
	if _, err := rr.r.Discard(n - 8); err != nil {
		return err
	}
	rr.off += int64(headerLen + n)
	return nil
}

// indexer accumulates sparse index entries.
type indexer struct {
	next int64
}

func (ix *indexer) add(idx []idxEntry, seq uint64, off int64) []idxEntry {
	if off >= ix.next {
		idx = append(idx, idxEntry{seq, off})
		ix.next = off + indexStride
	}
	return idx
}

// recoverSegment scans s fully, verifying every record, and fills s.size and
// s.index; it returns the seq of the last good record (s.first-1 if none)
// and, when a corrupt record has valid ones after it, the highest seq among
// those (after; else 0). Records after limit are dropped (a repair).
//
// What follows the last good record is either all zeros or a torn or corrupt
// tail. Zeros are the clean end of the data: the unused, preallocated rest of
// the segment (after a clean Close too), or blocks a crash left unwritten.
// They can never read as a record (a record's length is at least payloadMin)
// and the next appends overwrite them, so they stay. Any other tail is logged
// and truncated: bytes left after the records appended next could otherwise
// be scanned as records after the next crash (a stale whole record with the
// right seq, say, behind a torn one of the same length).
func recoverSegment(f *os.File, s *segment, limit uint64) (last, after uint64, err error) {
	st, err := f.Stat()
	if err != nil {
		return 0, 0, err
	}
	rr := newRecordReader(f, 0, st.Size(), 1<<20)
	var ix indexer
	s.index, s.indexed = nil, true
	last = s.first - 1
	good := int64(0)
	for {
		n, crc, seq, ok, err := rr.header()
		if !ok || err != nil || seq != last+1 || seq > limit {
			break
		}
		if _, err := rr.body(n, crc); err != nil {
			break
		}
		s.index = ix.add(s.index, seq, good)
		last, good = seq, rr.off
	}
	s.size = good
	if good < st.Size() {
		zero, err := zeroTail(f, good, st.Size())
		if err != nil {
			return 0, 0, err
		}
		if !zero {
			if limit == noLimit {
				if after, err = highestValidSeq(f, good, st.Size(), last); err != nil {
					return 0, 0, err
				}
			}
			klog.InfoS("event journal recovery: dropping a torn or corrupt tail after the last good record",
				"segment", s.path, "lastSeq", last, "offset", good, "bytes", st.Size()-good)
			if err := f.Truncate(good); err != nil {
				return 0, 0, err
			}
		}
	}
	// What a crashed process left in the page cache becomes durable here.
	if err := fileSync(f); err != nil {
		return 0, 0, err
	}
	s.newest = st.ModTime()
	return last, after, nil
}

// highestValidSeq looks through f[off:end] (what follows a bad record) for
// whole records with a valid CRC and a seq above last, at any offset, and
// returns the highest such seq (0 if none).
func highestValidSeq(f io.ReaderAt, off, end int64, last uint64) (uint64, error) {
	b := make([]byte, end-off)
	if n, err := f.ReadAt(b, off); err != nil && !(err == io.EOF && n == len(b)) {
		return 0, err
	}
	var high uint64
	for p := 0; p+headerLen+payloadMin <= len(b); p++ {
		n := int(binary.LittleEndian.Uint32(b[p:]))
		if n < payloadMin || n > maxPayload || p+headerLen+n > len(b) {
			continue
		}
		seq := binary.LittleEndian.Uint64(b[p+headerLen:])
		if seq <= last || seq > last+uint64(len(b)) { // at most one record per byte: anything else is noise
			continue
		}
		if r, ok := decodePayload(b[p+headerLen:p+headerLen+n], binary.LittleEndian.Uint32(b[p+4:])); ok && r.Seq > high {
			high = r.Seq
		}
	}
	return high, nil
}

// buildIndex scans the headers of a sealed segment for its sparse index. It
// stops quietly at a bad header; Read reports the corruption when it gets there.
func buildIndex(path string, first uint64, size int64) ([]idxEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	rr := newRecordReader(f, 0, size, 1<<20)
	var ix indexer
	var idx []idxEntry
	for want := first; ; want++ {
		off := rr.off
		n, _, seq, ok, err := rr.header()
		if !ok || err != nil || seq != want {
			return idx, nil
		}
		idx = ix.add(idx, seq, off)
		if err := rr.skipBody(n); err != nil {
			return idx, nil
		}
	}
}

// lookup returns the index entry to start scanning from for seq.
func lookup(idx []idxEntry, first, seq uint64) idxEntry {
	i := sort.Search(len(idx), func(i int) bool { return idx[i].seq > seq })
	if i == 0 {
		return idxEntry{first, 0}
	}
	return idx[i-1]
}

// syncDir fsyncs a directory so created files survive a power cut.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = fileSync(d)
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// segView is a snapshot of a segment taken by Read; end is its last seq
// (the next segment's first - 1 if sealed).
type segView struct {
	segment
	end    uint64
	sealed bool
}

// shortError: a segment's data ends cleanly before its last seq.
type shortError struct{ seq uint64 }

func (e *shortError) Error() string {
	return fmt.Sprintf("segment ends early, before record %d", e.seq)
}

// readSegment appends the records want..hi of v to out, verifying each.
func (j *Journal) readSegment(v *segView, want, hi uint64, out []Record) ([]Record, error) {
	if !v.indexed {
		idx, err := buildIndex(v.path, v.first, v.size)
		if err != nil {
			return nil, j.openErr(want, err)
		}
		v.index = idx
		j.mu.Lock()
		k := sort.Search(len(j.segs), func(k int) bool { return j.segs[k].first >= v.first })
		if k < len(j.segs) && j.segs[k].first == v.first && !j.segs[k].indexed {
			j.segs[k].index, j.segs[k].indexed = idx, true
		}
		j.mu.Unlock()
	}
	f, err := os.Open(v.path)
	if err != nil {
		return nil, j.openErr(want, err)
	}
	defer f.Close()
	e := lookup(v.index, v.first, want)
	rr := newRecordReader(f, e.off, v.size, 64<<10)
	for seq := e.seq; seq <= hi; seq++ {
		off := rr.off
		n, crc, got, ok, err := rr.header()
		if err == nil && !ok {
			return out, &shortError{seq}
		}
		if err == nil && got != seq {
			err = fmt.Errorf("%w: seq %d", errCorrupt, got)
		}
		if err == nil {
			if seq < want {
				err = rr.skipBody(n)
			} else {
				var rec Record
				if rec, err = rr.body(n, crc); err == nil {
					out = append(out, rec)
				}
			}
		}
		if err != nil {
			return nil, fmt.Errorf("journal: record %d at %s offset %d: %w", seq, v.path, off, err)
		}
	}
	return out, nil
}

// openErr turns a segment that retention removed under Read into ErrTruncated.
func (j *Journal) openErr(want uint64, err error) error {
	if errors.Is(err, fs.ErrNotExist) && want < j.First() {
		return &GapError{First: j.First()}
	}
	return fmt.Errorf("journal: %w", err)
}
