// Package zmqbridge publishes a node's volume events over ZeroMQ: every event
// is journaled (durably, with a sequence number) before it is published on a
// PUB socket, and a control socket replays the journal and forwards flush
// requests. It knows nothing of Ceph or CSI: callers hand it Events and
// answer flushes through the Flusher interface. The protocol is docs/events.md.
package zmqbridge
