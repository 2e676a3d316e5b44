#!/usr/bin/env bash
# cluster.sh — a throwaway single-host Ceph (Pacific) cluster for rookzmq e2e tests.
#
# Everything lives under one data directory DIR (env ROOKZMQ_CEPH_DIR, default
# /var/tmp/rookzmq-ceph): ceph.conf, keyrings, daemon data, pid files, admin
# sockets and logs. Daemons: mon.a (v2 127.0.0.1:3300, v1 127.0.0.1:6789),
# mgr.x, osd.0 (bluestore on a 4 GiB sparse file), mds.a. cephx is on.
# Pools: rbd; CephFS "cephfs" (cephfs_metadata, cephfs_data) with
# subvolumegroup "csi". Users: client.admin, client.csi-rbd, client.csi-cephfs.
#
# Usage: e2e/ceph/cluster.sh up|env|status|down
#   up      create and start the cluster and wait until it is healthy (all PGs
#           active+clean, MDS active). If its daemons already run, only wait
#           until it answers. A data directory without live daemons is wiped.
#   env     print shell export lines for the running cluster:
#             eval "$(e2e/ceph/cluster.sh env)"; ceph -s; rbd ls rbd
#   status  print `ceph -s`, or "not running" (exit status 1)
#   down    unmount whatever is mounted below DIR, stop this cluster's daemons
#           (pids from DIR/run/*.pid, each checked against /proc/PID/cmdline;
#           SIGTERM, SIGKILL after 15 s), then remove DIR. Idempotent.
#
# Environment: ROOKZMQ_CEPH_DIR (data directory), ROOKZMQ_CEPH_TIMEOUT
# (seconds `up` waits for the cluster, default 180). up/down serialise on
# ${TMPDIR:-/tmp}/rookzmq-ceph-cluster.lock.
set -euo pipefail
umask 077

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
SELF="$SCRIPT_DIR/$(basename -- "${BASH_SOURCE[0]}")"
INSTALL_DEPS="$SCRIPT_DIR/../install-deps.sh"

MON_ID=a
MGR_ID=x
MDS_ID=a
MON_V2=127.0.0.1:3300
MON_V1=127.0.0.1:6789
FS_NAME=cephfs
RBD_POOL=rbd
SUBVOLUMEGROUP=csi
RBD_USER=csi-rbd
CEPHFS_USER=csi-cephfs
TIMEOUT=${ROOKZMQ_CEPH_TIMEOUT:-180}
LOCK_FILE="${TMPDIR:-/tmp}/rookzmq-ceph-cluster.lock"
# the system python (the one the ceph CLI uses), not a pyenv/venv shim
PYTHON=/usr/bin/python3

# The ceph CLI must only ever see this cluster's config and keyrings.
unset CEPH_ARGS CEPH_CONF

START_US=${EPOCHREALTIME/./}
STEP_US=$START_US

# ---------------------------------------------------------------------------
# output helpers (all progress goes to stderr; stdout is for `env`/`status`)

fmt_us() { printf '%d.%01ds' $(($1 / 1000000)) $(($1 % 1000000 / 100000)); }

# log MSG: "[ total] MSG"
log() {
	local now=${EPOCHREALTIME/./}
	printf '[%6s] %s\n' "$(fmt_us $((now - START_US)))" "$*" >&2
}

# step MSG: "[ total] MSG (duration of this step)", then start a new step.
step() {
	local now=${EPOCHREALTIME/./}
	printf '[%6s] %s (%s)\n' "$(fmt_us $((now - START_US)))" "$*" "$(fmt_us $((now - STEP_US)))" >&2
	STEP_US=$now
}

die() {
	local now=${EPOCHREALTIME/./}
	printf '[%6s] cluster.sh: ERROR: %s\n' "$(fmt_us $((now - START_US)))" "$*" >&2
	exit 1
}

# shell_quote STR: STR as a single-quoted POSIX shell word.
shell_quote() {
	local q="'\\''"
	printf "'%s'" "${1//\'/$q}"
}

# ---------------------------------------------------------------------------
# data directory

resolve_dir() {
	local d=${ROOKZMQ_CEPH_DIR:-/var/tmp/rookzmq-ceph}
	[[ $d == /* ]] || die "ROOKZMQ_CEPH_DIR must be an absolute path (got '$d')"
	d=$(realpath -m -- "$d")
	# ceph.conf has no quoting: keep the path to characters it takes literally.
	[[ $d =~ ^/[A-Za-z0-9._/+-]+$ ]] ||
		die "ROOKZMQ_CEPH_DIR may only contain letters, digits and ._/+- (got '$d')"
	case "$d" in
	/ | /bin | /boot | /dev | /etc | /home | /lib | /lib64 | /opt | /proc | /root | /run | \
		/sbin | /srv | /sys | /tmp | /usr | /var | /var/lib | /var/tmp | /work)
		die "refusing to use '$d' as the cluster data directory"
		;;
	esac
	DIR=$d
	CONF=$DIR/ceph.conf
	RUN_DIR=$DIR/run
	LOG_DIR=$DIR/log
	STATE_FILE=$DIR/rookzmq-cluster.state # "creating" or "ready"; marks DIR as ours
	ADMIN_KEYRING=$DIR/ceph.client.admin.keyring
	RBD_KEYRING=$DIR/ceph.client.$RBD_USER.keyring
	CEPHFS_KEYRING=$DIR/ceph.client.$CEPHFS_USER.keyring
}

state() { cat "$STATE_FILE" 2>/dev/null || true; }

# dir_is_ours: DIR holds our state file, or is empty.
dir_is_ours() {
	[[ -f $STATE_FILE ]] && return 0
	[[ -z "$(ls -A -- "$DIR" 2>/dev/null)" ]]
}

# mounts_under_dir: mount points strictly below DIR, deepest first.
mounts_under_dir() {
	local _id _parent _dev _root mnt _rest
	while read -r _id _parent _dev _root mnt _rest; do
		mnt=$(printf '%b' "$mnt") # mountinfo escapes blanks as \040 etc.
		if [[ $mnt == "$DIR"/* ]]; then printf '%s\n' "$mnt"; fi
	done </proc/self/mountinfo | sort -r
}

dir_is_mountpoint() {
	local _id _parent _dev _root mnt _rest
	while read -r _id _parent _dev _root mnt _rest; do
		[[ "$(printf '%b' "$mnt")" == "$DIR" ]] && return 0
	done </proc/self/mountinfo
	return 1
}

# pid_alive PID: PID runs (and is no zombie: those have an empty cmdline).
pid_alive() {
	local c
	c=$(tr -d '\0' 2>/dev/null </proc/"$1"/cmdline) && [[ -n $c ]]
}

# pids_with_arg ARG...: processes that have one of ARGs as an argument, e.g.
# the ceph-fuse/rbd-fuse process serving a mount point.
pids_with_arg() {
	local p argv=() a m
	for p in /proc/[0-9]*; do
		mapfile -d '' -t argv 2>/dev/null <"$p/cmdline" || continue
		for a in "${argv[@]:1}"; do
			for m in "$@"; do
				if [[ $a == "$m" ]]; then
					echo "${p#/proc/}"
					continue 3
				fi
			done
		done
	done
	return 0
}

# unmount_under_dir: unmount everything mounted below DIR, and give the FUSE
# processes that served those mounts 15 s to exit while the cluster still
# runs (they are not ours: never killed). Fail if something stays mounted
# (DIR is then never removed).
unmount_under_dir() {
	local m mounts=() servers pid left deadline
	mapfile -t mounts < <(mounts_under_dir)
	[[ ${#mounts[@]} -gt 0 ]] || return 0
	servers=$(pids_with_arg "${mounts[@]}")
	for m in "${mounts[@]}"; do
		log "unmounting $m (it lies under $DIR)"
		timeout 30 umount -- "$m" 2>/dev/null || timeout 30 umount -l -- "$m" ||
			log "WARNING: could not unmount $m"
	done
	deadline=$((SECONDS + 15))
	for pid in $servers; do
		while pid_alive "$pid" && ((SECONDS < deadline)); do
			sleep 0.2
		done
		if pid_alive "$pid"; then
			log "WARNING: pid $pid ($(tr '\0' ' ' 2>/dev/null </proc/"$pid"/cmdline)) still runs after its unmount"
		fi
	done
	left=$(mounts_under_dir)
	[[ -z $left ]] || die "refusing to remove $DIR: still mounted below it: $(echo "$left" | tr '\n' ' ')"
}

# wipe_dir: remove DIR (or only its contents when DIR itself is a mount point).
wipe_dir() {
	[[ -d $DIR ]] || return 0
	dir_is_ours || die "refusing to remove $DIR: it is not empty and holds no $(basename "$STATE_FILE") (not created by this script?)"
	unmount_under_dir
	if dir_is_mountpoint; then
		find "$DIR" -mindepth 1 -maxdepth 1 -exec rm -rf --one-file-system -- {} +
	else
		rm -rf --one-file-system -- "$DIR"
	fi
}

# ---------------------------------------------------------------------------
# daemons: found by pid file, and confirmed through /proc/PID/cmdline

# cmdline_is_ours PID TYPE ID: PID runs ceph-TYPE -i ID with our ceph.conf.
cmdline_is_ours() {
	local pid=$1 type=$2 id=$3 argv=() i conf_ok=0 id_ok=0
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	[[ -r /proc/$pid/cmdline ]] || return 1
	mapfile -d '' -t argv 2>/dev/null </proc/"$pid"/cmdline || return 1
	[[ ${#argv[@]} -gt 0 && "$(basename -- "${argv[0]}")" == "ceph-$type" ]] || return 1
	for ((i = 1; i < ${#argv[@]}; i++)); do
		[[ ${argv[i]} == --conf && ${argv[i + 1]:-} == "$CONF" ]] && conf_ok=1
		[[ ${argv[i]} == -i && ${argv[i + 1]:-} == "$id" ]] && id_ok=1
	done
	[[ $conf_ok -eq 1 && $id_ok -eq 1 ]]
}

# live_daemons: "NAME PID" for every pid file in DIR/run whose process is alive
# and is the expected ceph daemon (stale pid files are ignored).
live_daemons() {
	local f name pid
	for f in "$RUN_DIR"/*.pid; do
		[[ -f $f ]] || continue
		name=$(basename "$f" .pid) # e.g. osd.0
		pid=$(tr -dc '0-9' 2>/dev/null <"$f" || true)
		[[ -n $pid ]] || continue
		cmdline_is_ours "$pid" "${name%%.*}" "${name#*.}" && echo "$name $pid"
	done
	return 0
}

# orphan_daemons: "NAME PID" for ceph daemons started with our ceph.conf that
# have no (valid) pid file, e.g. killed pid files or a crash during start.
orphan_daemons() {
	local known p pid argv=() type i id
	known=" $(live_daemons | awk '{print $2}' | tr '\n' ' ') "
	for p in /proc/[0-9]*; do
		pid=${p#/proc/}
		[[ $known == *" $pid "* ]] && continue
		mapfile -d '' -t argv 2>/dev/null <"$p/cmdline" || continue
		[[ ${#argv[@]} -gt 0 ]] || continue
		type=$(basename -- "${argv[0]}")
		case "$type" in ceph-mon | ceph-mgr | ceph-osd | ceph-mds) ;; *) continue ;; esac
		type=${type#ceph-}
		id=
		for ((i = 1; i < ${#argv[@]}; i++)); do
			[[ ${argv[i]} == -i ]] && id=${argv[i + 1]:-}
		done
		cmdline_is_ours "$pid" "$type" "$id" && echo "$type.$id $pid"
	done
	return 0
}

# wait_pidfile NAME: wait until the daemon NAME wrote its pid file and runs.
wait_pidfile() {
	local name=$1 type=${1%%.*} id=${1#*.} deadline=$((SECONDS + 30)) pid
	while ((SECONDS < deadline)); do
		pid=$(tr -dc '0-9' 2>/dev/null <"$RUN_DIR/$name.pid" || true)
		if [[ -n $pid ]] && cmdline_is_ours "$pid" "$type" "$id"; then
			return 0
		fi
		sleep 0.2
	done
	die "$name did not start (no live process in $RUN_DIR/$name.pid); see $LOG_DIR/ceph-$name.log"
}

# terminate "NAME PID" lines (stdin): SIGTERM them, wait up to 15 s, then
# SIGKILL the rest. Every pid is re-checked against /proc/PID/cmdline first.
terminate() {
	local daemons name pid left deadline killed=0
	daemons=$(cat)
	[[ -n $daemons ]] || return 0
	while read -r name pid; do
		if cmdline_is_ours "$pid" "${name%%.*}" "${name#*.}"; then
			log "stopping $name (pid $pid)"
			kill -TERM "$pid" 2>/dev/null || true
		fi
	done <<<"$daemons"
	deadline=$((SECONDS + 15))
	while :; do
		left=
		while read -r name pid; do
			if cmdline_is_ours "$pid" "${name%%.*}" "${name#*.}"; then
				left+="$name $pid"$'\n'
			fi
		done <<<"$daemons"
		[[ -z $left ]] && return 0
		if ((SECONDS >= deadline && killed == 0)); then
			while read -r name pid; do
				[[ -n $name ]] || continue
				log "$name (pid $pid) ignored SIGTERM for 15 s: sending SIGKILL"
				if cmdline_is_ours "$pid" "${name%%.*}" "${name#*.}"; then
					kill -KILL "$pid" 2>/dev/null || true
				fi
			done <<<"$left"
			killed=1
		elif ((SECONDS >= deadline + 10)); then
			die "could not stop: $(echo "$left" | tr '\n' ' ')"
		fi
		sleep 0.2
	done
}

# stop_daemons: stop every daemon of this cluster (those in pid files, and
# any started with our ceph.conf whose pid file is gone). The mon goes last:
# the others report their shutdown to it and otherwise wait for it in vain.
stop_daemons() {
	local daemons
	daemons=$( (live_daemons && orphan_daemons) | sort -u)
	if [[ -z $daemons ]]; then
		log "no daemon of this cluster is running"
		return 0
	fi
	{ grep -v '^mon\.' <<<"$daemons" || true; } | terminate
	{ grep '^mon\.' <<<"$daemons" || true; } | terminate
	step "daemons stopped"
}

# ---------------------------------------------------------------------------
# ceph CLI

# quiet CMD...: run CMD, show its output only if it fails (then abort).
quiet() {
	local out
	if ! out=$("$@" 2>&1); then
		printf '%s\n' "$out" >&2
		die "command failed: $*"
	fi
}

# ceph_ ARGS...: the ceph CLI as client.admin, never hanging forever.
ceph_() { timeout 60 ceph --conf "$CONF" --connect-timeout 15 "$@"; }

# cluster_answers: the monitor answers within a few seconds.
cluster_answers() { timeout 15 ceph --conf "$CONF" --connect-timeout 10 health >/dev/null 2>&1; }

# check_health NEED_MDS: prints "OK summary" or "WAIT summary".
check_health() {
	local need_mds=$1 status pools
	status=$(timeout 15 ceph --conf "$CONF" --connect-timeout 10 status -f json 2>/dev/null) || {
		echo "WAIT cluster not answering yet"
		return 0
	}
	pools=$(timeout 15 ceph --conf "$CONF" --connect-timeout 10 osd pool ls detail -f json 2>/dev/null) || pools='[]'
	printf '%s\n%s\n' "$status" "$pools" | "$PYTHON" -c '
import json, sys
need_mds = sys.argv[1] == "1"
data, dec, docs, pos = sys.stdin.read(), json.JSONDecoder(), [], 0
try:
    while len(docs) < 2:  # two JSON documents, with blank lines around them
        while pos < len(data) and data[pos].isspace():
            pos += 1
        doc, pos = dec.raw_decode(data, pos)
        docs.append(doc)
except ValueError:
    print("WAIT unparsable ceph status"); sys.exit(0)
st, pools = docs
health = st.get("health", {}).get("status", "?")
om = st.get("osdmap", {})
om = om.get("osdmap", om)  # older releases nest it
osds, osds_up = om.get("num_osds", 0), om.get("num_up_osds", 0)
mgr_ok = st.get("mgrmap", {}).get("available", False)
pg = st.get("pgmap", {})
want = sum(p.get("pg_num", 0) for p in pools)
total = pg.get("num_pgs", 0)
clean = sum(s["count"] for s in pg.get("pgs_by_state", []) if s["state_name"] == "active+clean")
ranks = st.get("fsmap", {}).get("by_rank", [])
mds = ",".join(r.get("status", "?") for r in ranks) or "none"
mds_ok = bool(ranks) and all(r.get("status") == "up:active" for r in ranks)
ok = (mgr_ok and osds > 0 and osds_up == osds and want > 0 and total == want
      and clean == total and (mds_ok or not need_mds))
print("%s %s, osd %d/%d up, mgr %s, pgs %d/%d active+clean, mds %s" % (
    "OK" if ok else "WAIT", health, osds_up, osds,
    "available" if mgr_ok else "unavailable", clean, want, mds))
' "$need_mds"
}

# wait_healthy NEED_MDS DEADLINE: poll check_health until OK, printing
# progress every 5 s; fail at DEADLINE (in $SECONDS).
wait_healthy() {
	local need_mds=$1 deadline=$2 res next=$((SECONDS + 5))
	while :; do
		res=$(check_health "$need_mds")
		[[ $res == OK* ]] && {
			step "cluster healthy: ${res#OK }"
			return 0
		}
		if ((SECONDS >= deadline)); then
			die "cluster not healthy after ${TIMEOUT}s: ${res#WAIT }; logs in $LOG_DIR"
		fi
		if ((SECONDS >= next)); then
			log "waiting: ${res#WAIT }"
			next=$((SECONDS + 5))
		fi
		sleep 1
	done
}

# ---------------------------------------------------------------------------
# up

ensure_packages() {
	local b missing=()
	for b in ceph ceph-mon ceph-mgr ceph-osd ceph-mds ceph-authtool monmaptool rbd uuidgen "$PYTHON" flock timeout ss; do
		command -v "$b" >/dev/null 2>&1 || missing+=("$b")
	done
	[[ ${#missing[@]} -eq 0 ]] && return 0
	log "missing commands: ${missing[*]}: running $INSTALL_DEPS --apt-only"
	[[ -x $INSTALL_DEPS ]] || die "$INSTALL_DEPS not found or not executable"
	"$INSTALL_DEPS" --apt-only || die "installing packages failed"
	for b in "${missing[@]}"; do
		command -v "$b" >/dev/null 2>&1 || die "command $b still missing after installing packages"
	done
	step "packages installed"
}

take_lock() {
	exec 9>>"$LOCK_FILE" || die "cannot open lock file $LOCK_FILE"
	flock -w 300 9 || die "another cluster.sh up/down holds $LOCK_FILE for more than 300 s"
}

check_ports_free() {
	local port users
	for port in 3300 6789; do
		users=$(ss -Hltnp "sport = :$port" 2>/dev/null || true)
		[[ -z $users ]] || die "port $port is already in use (another Ceph cluster? run 'cluster.sh down' with its ROOKZMQ_CEPH_DIR): $users"
	done
}

write_conf() {
	local fsid=$1
	cat >"$CONF" <<EOF
# rookzmq e2e throwaway single-host Ceph cluster.
# Generated by e2e/ceph/cluster.sh; removed by 'cluster.sh down'.
[global]
fsid = $fsid
mon host = [v2:$MON_V2,v1:$MON_V1]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $RUN_DIR
admin socket = $RUN_DIR/\$cluster-\$name.asok
log file = $LOG_DIR/\$cluster-\$name.log
mon cluster log file = $LOG_DIR/\$cluster.\$channel.log
crash dir = $DIR/crash
keyring = $DIR/\$cluster.\$name.keyring
mon data = $DIR/mon/\$cluster-\$id
mgr data = $DIR/mgr/\$cluster-\$id
osd data = $DIR/osd/\$cluster-\$id
mds data = $DIR/mds/\$cluster-\$id
# one OSD, no redundancy, no surprises
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# CI disks are often nearly full: do not warn at 30 % / stop at 5 % free
mon data avail warn = 2
mon data avail crit = 1
# a test cluster: commit map changes and report PG stats quickly
paxos propose interval = 0.1
mgr stats period = 1
mds beacon interval = 1

[mon]
keyring = \$mon_data/keyring
pid file = $RUN_DIR/\$name.pid

[mgr]
keyring = \$mgr_data/keyring
pid file = $RUN_DIR/\$name.pid

[osd]
keyring = \$osd_data/keyring
pid file = $RUN_DIR/\$name.pid
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 4294967296
osd memory target = 1073741824
bluestore cache autotune = false
bluestore cache size = 134217728

[mds]
keyring = \$mds_data/keyring
pid file = $RUN_DIR/\$name.pid

[client]
# one admin socket per client process, so concurrent clients never collide
admin socket = $RUN_DIR/\$cluster-\$name.\$pid.asok
log file = $LOG_DIR/\$cluster-\$name.log
log to stderr = false
err to stderr = false
EOF
	chmod 0644 "$CONF"
}

# start_daemon TYPE ID: start ceph-TYPE (it daemonizes and writes its pid file).
start_daemon() {
	local type=$1 id=$2
	local out=$LOG_DIR/ceph-$type.$id.stderr
	# The daemon keeps no descriptor of ours beyond 0-2: not our lock (fd 9),
	# nor a caller's (`flock FILE make test`), which it would hold for ever.
	(
		for fd in $(ls "/proc/$BASHPID/fd"); do
			[[ $fd -gt 2 ]] && eval "exec $fd>&-"
		done 2>/dev/null
		exec "ceph-$type" --conf "$CONF" -i "$id"
	) >"$out" 2>&1 </dev/null || {
		cat "$out" >&2
		die "ceph-$type -i $id failed to start; see $LOG_DIR/ceph-$type.$id.log"
	}
	wait_pidfile "$type.$id"
}

on_create_exit() {
	local rc=$?
	[[ $rc -eq 0 ]] && return 0
	printf '\ncluster.sh up failed; daemons (if any) were left running for inspection.\n' >&2
	printf 'Logs: %s\nClean up with: ROOKZMQ_CEPH_DIR=%s %s down\n' "$LOG_DIR" "$DIR" "$SELF" >&2
}

create_cluster() {
	local fsid osd_uuid osd_id osd_job deadline
	fsid=$(uuidgen)
	mkdir -p "$DIR"
	echo creating >"$STATE_FILE"
	trap on_create_exit EXIT
	mkdir -p "$RUN_DIR" "$LOG_DIR" "$DIR/crash" "$DIR/mon" "$DIR/mgr/ceph-$MGR_ID" "$DIR/mds/ceph-$MDS_ID" "$DIR/osd"
	chmod 0755 "$DIR" "$RUN_DIR" "$LOG_DIR"
	write_conf "$fsid"
	step "wrote $CONF (fsid $fsid)"

	# mon: keyrings (mon. and client.admin) and monmap
	quiet ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *'
	quiet ceph-authtool --create-keyring "$ADMIN_KEYRING" --gen-key -n client.admin \
		--cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *'
	quiet ceph-authtool "$DIR/mon.keyring" --import-keyring "$ADMIN_KEYRING"
	quiet monmaptool --create --fsid "$fsid" --addv "$MON_ID" "[v2:$MON_V2,v1:$MON_V1]" "$DIR/monmap"
	quiet ceph-mon --conf "$CONF" --mkfs -i "$MON_ID" --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring"
	rm -f "$DIR/monmap"
	start_daemon mon "$MON_ID"
	step "mon.$MON_ID started (v2 $MON_V2, v1 $MON_V1)"

	# mgr
	quiet ceph_ auth get-or-create "mgr.$MGR_ID" mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
		-o "$DIR/mgr/ceph-$MGR_ID/keyring"
	start_daemon mgr "$MGR_ID"
	step "mgr.$MGR_ID started"

	# osd: bluestore on a sparse file in its data directory. Its mkfs takes a
	# few seconds: run it in the background while the pools are created.
	osd_uuid=$(uuidgen)
	osd_id=$(ceph_ osd new "$osd_uuid")
	[[ $osd_id =~ ^[0-9]+$ ]] || die "ceph osd new returned '$osd_id'"
	mkdir -p "$DIR/osd/ceph-$osd_id"
	quiet ceph_ auth get-or-create "osd.$osd_id" mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *' \
		-o "$DIR/osd/ceph-$osd_id/keyring"
	(
		quiet ceph-osd --conf "$CONF" -i "$osd_id" --mkfs --osd-uuid "$osd_uuid"
		start_daemon osd "$osd_id"
		log "osd.$osd_id started (bluestore on $DIR/osd/ceph-$osd_id/block)"
	) &
	osd_job=$!
	step "osd.$osd_id created, starting in the background"

	# mds (standby until the file system exists)
	quiet ceph_ auth get-or-create "mds.$MDS_ID" mon 'allow profile mds' osd 'allow *' mds 'allow' mgr 'allow profile mds' \
		-o "$DIR/mds/ceph-$MDS_ID/keyring"
	start_daemon mds "$MDS_ID"
	step "mds.$MDS_ID started"

	# pools and file system
	quiet ceph_ osd pool create "$RBD_POOL" 8
	quiet ceph_ osd pool application enable "$RBD_POOL" rbd
	quiet ceph_ osd pool create cephfs_metadata 8
	quiet ceph_ osd pool create cephfs_data 8
	quiet ceph_ fs new "$FS_NAME" cephfs_metadata cephfs_data
	# a single MDS: do not warn about missing standbys
	quiet ceph_ fs set "$FS_NAME" standby_count_wanted 0
	step "pools $RBD_POOL, cephfs_metadata, cephfs_data and file system $FS_NAME created"

	# CSI users (keys only ever in keyring files, mode 0600)
	quiet ceph_ auth get-or-create "client.$RBD_USER" \
		mon 'profile rbd' osd "profile rbd pool=$RBD_POOL" mgr "profile rbd pool=$RBD_POOL" \
		-o "$RBD_KEYRING"
	quiet ceph_ auth get-or-create "client.$CEPHFS_USER" \
		mgr 'allow rw' \
		osd 'allow rw tag cephfs metadata=*, allow rw tag cephfs data=*' \
		mon 'allow r' \
		mds "allow rw fsname=$FS_NAME path=/volumes, allow rws fsname=$FS_NAME path=/volumes/$SUBVOLUMEGROUP" \
		-o "$CEPHFS_KEYRING"
	chmod 0600 "$ADMIN_KEYRING" "$RBD_KEYRING" "$CEPHFS_KEYRING" "$DIR/mon.keyring"
	step "users client.$RBD_USER and client.$CEPHFS_USER created"

	wait "$osd_job" || die "osd.$osd_id failed to start; see $LOG_DIR/ceph-osd.$osd_id.log"
	step "osd.$osd_id running"

	deadline=$((SECONDS + TIMEOUT))
	wait_healthy 1 "$deadline"

	quiet timeout 60 rbd --conf "$CONF" pool init "$RBD_POOL"
	quiet ceph_ fs subvolumegroup create "$FS_NAME" "$SUBVOLUMEGROUP"
	step "rbd pool initialised, subvolumegroup $SUBVOLUMEGROUP created"

	verify_users
	step "verified client.$RBD_USER (rbd create/rm) and client.$CEPHFS_USER (subvolume create/rm)"

	wait_healthy 1 "$deadline"
	echo ready >"$STATE_FILE"
	trap - EXIT
}

# verify_users: the CSI users can do what the driver needs.
verify_users() {
	local img="rookzmq-selftest-$$" sv="rookzmq-selftest-$$"
	timeout 60 rbd --conf "$CONF" --id "$RBD_USER" create "$RBD_POOL/$img" --size 16M ||
		die "client.$RBD_USER cannot create an rbd image"
	timeout 60 rbd --conf "$CONF" --id "$RBD_USER" rm --no-progress "$RBD_POOL/$img" ||
		die "client.$RBD_USER cannot remove an rbd image"
	timeout 60 ceph --conf "$CONF" --id "$CEPHFS_USER" fs subvolume create "$FS_NAME" "$sv" --group_name "$SUBVOLUMEGROUP" ||
		die "client.$CEPHFS_USER cannot create a subvolume"
	timeout 60 ceph --conf "$CONF" --id "$CEPHFS_USER" fs subvolume getpath "$FS_NAME" "$sv" --group_name "$SUBVOLUMEGROUP" >/dev/null ||
		die "client.$CEPHFS_USER cannot get a subvolume path"
	timeout 60 ceph --conf "$CONF" --id "$CEPHFS_USER" fs subvolume rm "$FS_NAME" "$sv" --group_name "$SUBVOLUMEGROUP" ||
		die "client.$CEPHFS_USER cannot remove a subvolume"
}

# wait_answer: an already running cluster answers within TIMEOUT.
wait_answer() {
	local deadline=$((SECONDS + TIMEOUT)) next=$((SECONDS + 5))
	until cluster_answers; do
		((SECONDS < deadline)) || die "cluster in $DIR runs but does not answer after ${TIMEOUT}s; logs in $LOG_DIR"
		if ((SECONDS >= next)); then
			log "waiting for the running cluster to answer"
			next=$((SECONDS + 5))
		fi
		sleep 1
	done
}

cmd_up() {
	ensure_packages
	take_lock

	local live orphans missing n
	live=$(live_daemons)
	orphans=$(orphan_daemons)
	if [[ -n $orphans ]]; then
		log "WARNING: daemons using $CONF run without a valid pid file: $(echo "$orphans" | tr '\n' ' ')"
		live+=$'\n'$orphans
	fi
	if [[ -n ${live//$'\n'/} ]]; then
		log "cluster already running in $DIR: $(echo "$live" | tr '\n' ' ')"
		if [[ "$(state)" != ready ]]; then
			die "the cluster in $DIR is incomplete (state '$(state)': an earlier 'up' failed or is still running); run 'cluster.sh down' then 'up'"
		fi
		wait_answer
		missing=
		for n in "mon.$MON_ID" "mgr.$MGR_ID" osd.0 "mds.$MDS_ID"; do
			[[ $live == *"$n "* ]] || missing+="$n "
		done
		[[ -z $missing ]] || log "WARNING: not running: ${missing}(use 'cluster.sh down' and 'up' to re-create)"
		step "cluster answers: $(ceph_ health 2>/dev/null || echo '?'); nothing to do"
		return 0
	fi

	if [[ -e $DIR ]]; then
		dir_is_ours || die "refusing to use $DIR: it is not empty and holds no $(basename "$STATE_FILE") (not created by this script?)"
		log "$DIR exists but no daemon of it is alive: wiping it and creating a new cluster"
		wipe_dir
		step "wiped $DIR"
	fi
	check_ports_free
	create_cluster
	log "cluster ready in $(fmt_us $((${EPOCHREALTIME/./} - START_US))) — use: eval \"\$($SELF env)\""
}

# ---------------------------------------------------------------------------
# env, status, down

# keyring_key FILE: the secret in a keyring file.
keyring_key() {
	local key
	key=$(sed -n 's/^[[:space:]]*key[[:space:]]*=[[:space:]]*//p' "$1" 2>/dev/null | head -n1)
	[[ -n $key ]] || die "no key in $1"
	printf '%s' "$key"
}

cmd_env() {
	[[ -n "$(live_daemons)" ]] || die "cluster is not running (no live daemon in $RUN_DIR); run 'cluster.sh up'"
	[[ "$(state)" == ready ]] || die "cluster in $DIR is not ready (state '$(state)')"
	cluster_answers || die "cluster in $DIR does not answer; see 'cluster.sh status' and $LOG_DIR"
	local fsid name value
	fsid=$(sed -n 's/^fsid = //p' "$CONF")
	local -a vars=(
		CEPH_CONF "$CONF"
		# $cluster/$name are expanded by Ceph: the keyring of whichever user
		# runs (client.admin by default). Ceph lets CEPH_ARGS win over the
		# command line, so it must not pin one user's keyring or --id.
		CEPH_ARGS "--keyring=$DIR/\$cluster.\$name.keyring"
		ROOKZMQ_CEPH_DIR "$DIR"
		ROOKZMQ_CEPH_MONITORS "$MON_V1"
		ROOKZMQ_CEPH_FSID "$fsid"
		ROOKZMQ_CEPH_ADMIN_KEY "$(keyring_key "$ADMIN_KEYRING")"
		ROOKZMQ_CEPH_RBD_POOL "$RBD_POOL"
		ROOKZMQ_CEPH_RBD_USER "$RBD_USER"
		ROOKZMQ_CEPH_RBD_KEY "$(keyring_key "$RBD_KEYRING")"
		ROOKZMQ_CEPH_FS_NAME "$FS_NAME"
		ROOKZMQ_CEPH_SUBVOLUMEGROUP "$SUBVOLUMEGROUP"
		ROOKZMQ_CEPH_CEPHFS_USER "$CEPHFS_USER"
		ROOKZMQ_CEPH_CEPHFS_KEY "$(keyring_key "$CEPHFS_KEYRING")"
	)
	while [[ ${#vars[@]} -gt 0 ]]; do
		name=${vars[0]} value=${vars[1]}
		vars=("${vars[@]:2}")
		printf 'export %s=%s\n' "$name" "$(shell_quote "$value")"
	done
}

cmd_status() {
	if [[ -z "$(live_daemons)" ]]; then
		if [[ -e $DIR ]]; then
			echo "not running (stale data directory $DIR)"
		else
			echo "not running"
		fi
		return 1
	fi
	ceph_ -s
}

cmd_down() {
	take_lock
	if [[ -e $DIR ]] && ! dir_is_ours; then
		die "refusing to touch $DIR: it is not empty and holds no $(basename "$STATE_FILE") (not created by this script?)"
	fi
	# unmount first, while the cluster can still serve the FUSE clients
	[[ -d $DIR ]] && unmount_under_dir
	stop_daemons
	if [[ -e $DIR ]]; then
		wipe_dir
		step "removed $DIR"
	else
		step "$DIR does not exist: nothing to remove"
	fi
}

usage() { sed -n '2,26s/^# \{0,1\}//p' "$SELF"; }

main() {
	local cmd=${1:-}
	case "$cmd" in
	up | env | status | down) resolve_dir ;;
	-h | --help | help)
		usage
		return 0
		;;
	*)
		usage >&2
		die "unknown or missing subcommand '${cmd}'"
		;;
	esac
	"cmd_$cmd"
}

main "$@"
