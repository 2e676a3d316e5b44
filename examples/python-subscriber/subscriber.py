#!/usr/bin/python3
"""Receive every rookzmq node event exactly once, in order (docs/events.md).

Subscribe first, then replay from the last sequence seen, then de-duplicate
live messages by seq; replay again on a gap or on a heartbeat that is ahead.
Needs only pyzmq (Debian: python3-zmq).

    subscriber.py --dir /events --state /var/lib/agent/events.seq
    subscriber.py --dir /events --flush-pvc data --flush-namespace team-a
"""

import argparse
import json
import os
import random
import signal
import sys
import time

import zmq

DEFAULT_DIR = "/var/lib/kubelet/plugins/rbd.rookzmq.io/events"


class Stopped(Exception):
    """SIGTERM or SIGINT arrived; raised only between two events."""


class Requester:
    """Control requests over REQ; a REQ socket without a reply is replaced."""

    def __init__(self, zctx, addr, timeout, stopping):
        self.zctx, self.addr, self.timeout, self.stopping = zctx, addr, timeout, stopping
        self.sock = None

    def call(self, req):
        if self.sock is None:
            self.sock = self.zctx.socket(zmq.REQ)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.addr)
        self.sock.send(json.dumps(req).encode())
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not self.stopping():
            if self.sock.poll(200, zmq.POLLIN):
                return json.loads(self.sock.recv())
        self.close()
        if self.stopping():
            raise Stopped()
        raise TimeoutError("no reply from %s within %ss" % (self.addr, self.timeout))

    def request(self, req):
        """call(req), again after an error reply that asks for a retry (busy,
        aborted, unavailable, internal), with exponential backoff, until the
        timeout has passed since the first try; then the last reply stands."""
        deadline = time.monotonic() + self.timeout
        pause = 0.1
        while True:
            rep = self.call(req)
            if "error" not in rep or not retryable(rep.get("code", "")):
                return rep
            wait = pause / 2 + random.random() * pause  # jittered: clients told busy together do not come back together
            if time.monotonic() + wait > deadline:
                return rep
            print("%s (code %s); retrying in %.3fs" % (rep["error"], rep.get("code"), wait), file=sys.stderr)
            end = time.monotonic() + wait
            while time.monotonic() < end:
                if self.stopping():
                    raise Stopped()
                time.sleep(min(0.05, end - time.monotonic()))
            pause = min(2 * pause, 5.0)

    def close(self):
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


def retryable(code):
    """Whether an error reply's code says "try again later" (docs/events.md,
    "Error replies"): busy, aborted, unavailable, internal, and codes this
    client does not know, which count as internal."""
    return code not in ("", "bad_request", "unauthorized", "not_found", "unsupported", "truncated")


def topic_of(ev):
    if ev.get("pvc") and ev.get("namespace"):
        return "%s/%s/%s" % (ev["kind"], ev["namespace"], ev["pvc"])
    return "%s/%s" % (ev["kind"], ev.get("volume_id", ""))


def write_state(path, seq, epoch):
    """Atomically replace the state file ("<seq> <epoch>"): temporary file, fsync, rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(("%d %s" % (seq, epoch or "")).strip() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Subscriber:
    def __init__(self, args, zctx, stopping):
        self.args, self.stopping = args, stopping
        self.last, self.epoch = args.since, ""
        if args.state and os.path.exists(args.state):
            with open(args.state) as f:
                fields = f.read().split()  # "<seq> <epoch>" (the epoch may be missing)
            self.last = int(fields[0])
            if len(fields) > 1:
                self.epoch = fields[1]
        self.req = Requester(zctx, args.control, args.timeout, stopping)

    def advance(self, seq):
        self.last = seq
        if self.args.state:
            write_state(self.args.state, seq, self.epoch)

    def new_epoch(self, epoch):
        """Check a message's journal epoch; True if it changed (position reset to 0)."""
        if not epoch or epoch == self.epoch:
            return False
        if not self.epoch:
            self.epoch = epoch
            return False
        print("WARNING: the node's event journal was made anew (epoch %s, was %s): events of the "
              "old one not yet seen are lost; starting again from its first event" % (epoch, self.epoch),
              file=sys.stderr)
        self.epoch = epoch
        self.advance(0)
        return True

    def deliver(self, ev, line):
        """Print ev (as the one-line JSON line) if it is new and matches --topic."""
        if self.stopping():
            raise Stopped()
        if ev["seq"] <= self.last:
            return  # seen already
        if topic_of(ev).startswith(self.args.topic):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()  # printed before the state file says so
        self.advance(ev["seq"])

    def replay(self):
        """Page from self.last until the node's last sequence."""
        while True:
            try:
                rep = self.req.request({"op": "replay", "since": self.last, "max": 1000})
            except TimeoutError as e:
                print("replay: %s; retrying" % e, file=sys.stderr)
                time.sleep(1)
                continue
            if self.new_epoch(rep.get("epoch")):
                continue  # ask the new journal from 0
            if rep.get("error") == "truncated" and rep["first"] > self.last + 1:
                print("WARNING: journal truncated: events %d..%d are gone; continuing from %d"
                      % (self.last + 1, rep["first"] - 1, rep["first"]), file=sys.stderr)
                self.advance(rep["first"] - 1)
                continue
            if "error" in rep and retryable(rep.get("code", "")):  # still failing after the retries
                print("replay: %s (code %s); retrying" % (rep["error"], rep.get("code")), file=sys.stderr)
                continue
            if "error" in rep:
                raise RuntimeError("replay: %s" % rep["error"])
            for ev in rep["events"]:
                # Re-encoded compactly: one line, like the live messages.
                self.deliver(ev, json.dumps(ev, separators=(",", ":"), ensure_ascii=False))
            # "next" is how far the node looked: on a scoped endpoint what it
            # skipped belongs to other namespaces; ask again from there.
            before = self.last
            if rep.get("next", 0) > self.last:
                self.advance(rep["next"])
            if self.last >= rep["last"] or (self.last == before and not rep["events"]):
                return

    def run(self, sub):
        time.sleep(0.05)  # let the subscription reach the publisher
        self.replay()
        while not self.stopping():
            if not sub.poll(200, zmq.POLLIN):
                continue
            frames = sub.recv_multipart()
            if len(frames) != 2:
                continue
            try:
                ev = json.loads(frames[1])
            except ValueError:
                continue
            seq = ev.get("seq", 0)
            if self.new_epoch(ev.get("epoch")):
                self.replay()  # the new journal from its start
            elif ev.get("kind") == "hb" and frames[0].startswith(b"hb/"):
                if seq > self.last:
                    self.replay()  # silence was loss
            elif seq <= self.last:
                pass  # seen already (in a replay)
            elif seq == self.last + 1:
                self.deliver(ev, frames[1].decode())
            else:  # a gap: loss, or other namespaces' events on a scoped endpoint
                self.replay()
                self.deliver(ev, frames[1].decode())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=DEFAULT_DIR, help="directory holding events.sock and control.sock")
    p.add_argument("--events", help="events (PUB) address (default ipc://DIR/events.sock)")
    p.add_argument("--control", help="control (ROUTER) address (default ipc://DIR/control.sock)")
    p.add_argument("--topic", default="", help="topic prefix to print, e.g. attach/ (default all)")
    p.add_argument("--since", type=int, default=0, help="print events with seq greater than this")
    p.add_argument("--state", help="file persisting the last seq seen, to resume exactly after a restart")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for a control reply")
    p.add_argument("--flush-volume", help="flush this volume ID, print the reply and exit")
    p.add_argument("--flush-pvc", help="flush this PVC (with --flush-namespace), print the reply and exit")
    p.add_argument("--flush-namespace", default="", help="namespace of --flush-pvc")
    args = p.parse_args()
    args.events = args.events or "ipc://" + os.path.join(args.dir, "events.sock")
    args.control = args.control or "ipc://" + os.path.join(args.dir, "control.sock")

    stop = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.append(True))
    stopping = lambda: bool(stop)

    zctx = zmq.Context()
    try:
        if args.flush_volume or args.flush_pvc:
            req = Requester(zctx, args.control, args.timeout, stopping)
            try:
                if args.flush_volume:
                    rep = req.request({"op": "flush", "volume_id": args.flush_volume})
                else:
                    rep = req.request({"op": "flush", "pvc": args.flush_pvc, "namespace": args.flush_namespace})
            finally:
                req.close()
            print(json.dumps(rep, separators=(",", ":")), flush=True)
            return 1 if "error" in rep else 0
        sub = zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100000)
        # Gap detection needs every seq: subscribe to everything, apply --topic here.
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(args.events)
        s = Subscriber(args, zctx, stopping)
        try:
            s.run(sub)
        except Stopped:
            pass
        finally:
            s.req.close()
            sub.close(linger=0)
        return 0
    finally:
        zctx.term()


if __name__ == "__main__":
    sys.exit(main())
