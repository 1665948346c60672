#!/bin/bash
# e2e-needs: scratch-disk=4G guest-bin=xatastor-target,examples/zfs_timing guest-cmdline@6.1=hardened_usercopy=off
#
# hardened_usercopy=off (only with --kernel 6.1; 6.12 has the fix and runs with the check on):
# the guest's Debian 6.1 kernel has a false positive of the hardened-usercopy
# check when a user-space process receives, over the loopback, what the kernel's own nvme-tcp host
# sent from a multi-page bio_vec (XFS/page-cache writes): skb_copy_datagram_iter copies a frag that
# spans several pages in one piece, __check_object_size sees it run past the page allocation and
# the kernel BUGs in the receiving thread ("usercopy: Kernel memory exposure attempt detected from
# page alloc", seen here in a xatastor-target worker's io_uring recv during node-postgres-branch,
# 2 of 2 runs; upstream copies page by page since d2d30a376d9c, v6.10;
# the same crash is reported for other user-space NVMe/TCP targets on Debian 6.1, e.g.
# openebs/mayastor#1330 and #1693). The thread dies, the worker's connections hang and the process
# cannot shut down. Host and target on different machines do not hit it (the frags then come from
# the NIC). Any kernel oops during a scenario fails that scenario (see the driver below).
#
# The storage node end to end, run INSIDE the guest by /sbin/xe2e-init (tests/e2e/run.sh --suite node):
# `xatastor-target serve --backend zvol:POOL/xs` on real ZFS (the image's OpenZFS 2.1), managed with
# its own admin subcommands (`volume create/show/list/resize/delete/clone`, `snapshot create/list`,
# `status`, over DATA/admin.sock), and the guest's kernel NVMe/TCP initiator connecting to it over
# 127.0.0.1 with the exact `nvme connect` line that `volume show` prints: the README's walkthrough.
#
# run.sh ships the host-built xatastor-target and zvol-backend's zfs_timing example on a read-only
# disk (guest-bin, mounted on /opt/xe2e-bin, in PATH) and attaches a blank 4 GiB scratch disk
# (E2E_SCRATCH_DEV) for the pool.
#
# Input (environment, from run.sh's env file and the init):
#   E2E_SCRATCH_DEV  the blank disk for the pool (set by the init, serial xe2e-scratch)
#   E2E_BIN_DIR      where the binaries are (set by the init, serial xe2e-bin)
#   E2E_ONLY         optional space-separated list of scenario names to run
# The host identity is the guest's own /etc/nvme/hostnqn (made with `nvme gen-hostnqn` if missing),
# as on a real host; nvme-cli picks it up by itself.
#
# Output: "PLAN <names>", then one "PASS <name>" / "FAIL <name>: <reason>" line per scenario,
# "TIME <name> <s>s" and "INFO <name> <key=value...>" lines (measurements) on /dev/ttyS1;
# everything else (commands, their output, the server log, zfs list, dmesg) on the console.
# Scenarios keep going after a failure; each one sets up what it needs (pool, server, volume,
# connection) idempotently, so it can also run alone (--only).
set -uo pipefail

RESULTS=/dev/ttyS1
STATE=/run/e2e
MNT=/mnt/e2e
mkdir -p "$STATE" "$MNT"

POOL=xe2e
DS=$POOL/xs            # the node's parent dataset (--backend zvol:$DS)
DATA=$STATE/node       # the node's data directory (catalog, admin.sock); tmpfs, survives restarts
PORT=4420
SERVER_LOG=$STATE/server.log
XT=xatastor-target
# For connections that must end quickly once their volume is gone (the kernel's default is to
# retry for 600 s), added after the connect line `volume show` prints.
FAST_LOSS=(--ctrl-loss-tmo=20 --reconnect-delay=2)
FIO_TIMEOUT=900
ARC_MAX=$(( 256 << 20 ))
DISCARD_MIB=200
DISCARD_MIN_FREED_MIB=150
RESIZE_WAIT_S=20
PG_SCALE=5
# node-upgrade: how many upgrades, which one is done by SIGHUP, the seconds of I/O before and
# between them, and fio's run time (must span them all; the scenario fails if fio ends early).
UPGRADES=5
UPGRADE_SIGHUP=4
UPGRADE_GAP_S=${UPGRADE_GAP_S:-3}
UPGRADE_FIO_RUNTIME=${UPGRADE_FIO_RUNTIME:-50}
# The host of the volume "other", which this host must not discover.
OTHER_HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:0e2e0000-0000-4000-8000-0000000000aa

# e2e-include: lib/common.sh
one_line() { tr '\n' ' ' | sed 's/\x1b\[[0-9;]*m//g; s/  */ /g' | cut -c1-300; }

# ---------------------------------------------------------------------------------------
# host identity: the guest's own, as nvme-cli and the kernel use it

host_identity() {
    mkdir -p /etc/nvme
    if [[ ! -s /etc/nvme/hostnqn ]]; then
        nvme gen-hostnqn > /etc/nvme/hostnqn || fail "nvme gen-hostnqn failed"
        log "generated /etc/nvme/hostnqn: $(cat /etc/nvme/hostnqn)"
    fi
    if [[ ! -s /etc/nvme/hostid ]]; then
        # The UUID of a uuid-style host NQN, as nvme-cli's own packaging does.
        local id
        id=$(sed -n 's/.*:uuid:\([0-9a-fA-F-]\{36\}\)$/\1/p' /etc/nvme/hostnqn)
        echo "${id:-$(cat /proc/sys/kernel/random/uuid)}" > /etc/nvme/hostid
    fi
    HOSTNQN=$(cat /etc/nvme/hostnqn)
}
host_identity

# ---------------------------------------------------------------------------------------
# ZFS

# e2e-include: lib/zfs.sh

# The pool on the scratch disk and the node's parent dataset.
pool_setup() {
    pool_create
    zfs list -H "$DS" > /dev/null 2>&1 || x zfs create "$DS" || fail "zfs create $DS failed"
}

# Volume names under DS, as ZFS sees them (sorted, one per line).
zfs_volumes() { zfs list -H -o name -t volume -r -d 1 "$DS" | sed "s|^$DS/||" | sort; }
zfs_snapshots() { zfs list -H -o name -t snapshot -r -d 2 "$DS" | sed "s|^$DS/||" | sort; }

# ---------------------------------------------------------------------------------------
# the node: server process and admin subcommands

# xt ARGS...: one admin subcommand against the running node (bounded).
xt() { timeout -k 5 120 "$XT" --data-dir "$DATA" "$@"; }
# json_get KEY: a top-level field of the JSON object on stdin (lists: one element per line;
# null: empty).
json_get() {
    python3 -c '
import json, sys
v = json.load(sys.stdin).get(sys.argv[1])
if isinstance(v, list):
    print("\n".join(str(e) for e in v))
elif v is None:
    pass
elif isinstance(v, bool):
    print("true" if v else "false")
else:
    print(v)' "$1"
}
# vol_get NAME KEY: one field of `volume show --json NAME`.
vol_get() { xt --json volume show "$1" | json_get "$2"; }
# Volume names in the catalog (`volume list --json`), sorted, one per line.
catalog_volumes() { xt --json volume list | python3 -c 'import json, sys; print("\n".join(sorted(v["name"] for v in json.load(sys.stdin))))'; }
catalog_snapshots() {
    local v
    for v in $(catalog_volumes); do
        xt --json volume show "$v" | python3 -c '
import json, sys
d = json.load(sys.stdin)
for s in d.get("snapshots") or []:
    print(d["name"] + "@" + (s["name"] if isinstance(s, dict) else str(s)))'
    done | sort
}

server_pid() { cat "$STATE/server.pid" 2>/dev/null; }
# pid_alive PID: the process exists and is not a zombie. After an upgrade (node-upgrade) the
# serving node is not a child of server_start's wrapper (the old node started it and exited; PID 1
# adopted it), so only its pid tells whether it runs.
pid_alive() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [[ -n $st && $st != Z && $st != X ]]; }
server_running() { local p; p=$(server_pid) && [[ -n $p ]] && pid_alive "$p"; }

# server_start: `xatastor-target serve` in the background (idempotent). A wrapper records its exit
# status in STATE/server.rc, so a later scenario can check how it ended.
server_start() {
    server_running && return 0
    pool_setup
    command -v "$XT" > /dev/null || fail "$XT not in PATH (E2E_BIN_DIR='${E2E_BIN_DIR:-}'): run through run.sh (guest-bin)"
    mkdir -p "$DATA"
    rm -f "$STATE/server.rc" "$STATE/server.pid"
    touch "$SERVER_LOG"
    local n i
    n=$(grep -c '^xatastor-target: serving ' "$SERVER_LOG")
    echo "===== [$(now)s] start: $XT --data-dir $DATA serve --backend zvol:$DS --listen 127.0.0.1:$PORT --metrics-listen off =====" >> "$SERVER_LOG"
    log "+ $XT --data-dir $DATA serve --backend zvol:$DS --listen 127.0.0.1:$PORT --metrics-listen off --log info &"
    (
        NO_COLOR=1 "$XT" --data-dir "$DATA" serve --backend "zvol:$DS" --listen "127.0.0.1:$PORT" \
            --metrics-listen off --log info &
        echo $! > "$STATE/server.pid"
        wait $!
        # Written whole or not at all: a reader never sees an empty status.
        echo $? > "$STATE/server.rc.tmp" && mv "$STATE/server.rc.tmp" "$STATE/server.rc"
    ) >> "$SERVER_LOG" 2>&1 < /dev/null &
    for i in $(seq 1 300); do
        [[ -s $STATE/server.pid ]] && (( $(grep -c '^xatastor-target: serving ' "$SERVER_LOG") > n )) && break
        [[ -e $STATE/server.rc ]] && { server_log_tail 30; fail "xatastor-target serve exited at startup (status $(cat "$STATE/server.rc")): $(tail -n 3 "$SERVER_LOG" | one_line)"; }
        sleep 0.2
    done
    (( $(grep -c '^xatastor-target: serving ' "$SERVER_LOG") > n )) \
        || { server_log_tail 30; fail "xatastor-target serve did not print 'serving ...' within 60s"; }
    [[ -S $DATA/admin.sock ]] || fail "no admin socket $DATA/admin.sock after start"
    log "server pid $(server_pid): $(grep '^xatastor-target: serving ' "$SERVER_LOG" | tail -n1)"
}

server_log_tail() { echo "===== last $1 lines of $SERVER_LOG ====="; tail -n "$1" "$SERVER_LOG"; echo "====="; }

# server_stop SIGNAL: sends it and waits (60 s) for the process to end; prints its exit status
# ("unknown" for a node started by an upgrade: not server_start's child, its status is not seen).
server_stop() {
    local sig=$1 pid i
    pid=$(server_pid) || return 0
    x kill -"$sig" "$pid" >&2
    for i in $(seq 1 300); do { [[ -e $STATE/server.rc ]] || ! pid_alive "$pid"; } && break; sleep 0.2; done
    # The wrapper writes the status just after the process is gone (at once after a SIGKILL): give
    # it a moment before calling the status unknown.
    for i in $(seq 1 50); do [[ -e $STATE/server.rc ]] && break; pid_alive "$pid" && break; sleep 0.1; done
    if [[ ! -e $STATE/server.rc ]]; then
        pid_alive "$pid" && { server_log_tail 30 >&2; fail "xatastor-target (pid $pid) still running 60s after SIG$sig"; }
        echo unknown > "$STATE/server.rc"
    fi
    cat "$STATE/server.rc"
}

# ensure_volume NAME SIZE [create options...]: the volume exists (created for this host if not).
ensure_volume() {
    local name=$1 size=$2
    shift 2
    server_start
    xt volume show "$name" > /dev/null 2>&1 && return 0
    x xt volume create "$name" --size "$size" --allow-host "$HOSTNQN" "$@" >&2 \
        || fail "volume create $name --size $size $* failed"
}

# e2e-include: lib/nvme.sh

# connect_vol NAME [extra nvme connect options]: connected to volume NAME with the exact connect
# line of `volume show --json` (plus the extra options), reusing a live connection; prints the
# namespace device name.
connect_vol() {
    local name=$1 nqn line d i
    shift
    nqn=$(vol_get "$name" nqn) && [[ -n $nqn ]] || fail "volume show $name --json has no nqn"
    if d=$(ns_dev_of "$nqn"); then echo "$d"; return 0; fi
    line=$(vol_get "$name" connect) && [[ $line == "nvme connect "* ]] || fail "volume show $name --json: connect is '$line', not an nvme connect line"
    need_nvme_tcp
    local argv
    read -r -a argv <<< "$line"
    echo "+ timeout 60 ${argv[*]} $*" >&2
    timeout 60 "${argv[@]}" "$@" >&2 || fail "'$line $*' failed (rc=$?)"
    for i in $(seq 1 150); do
        if d=$(ns_dev_of "$nqn"); then echo "$d"; return 0; fi
        sleep 0.2
    done
    fail "namespace block device of $nqn did not appear within 30s after nvme connect"
}

disconnect_nqn() {
    local nqn=$1 i
    [[ -z $(ctrls_of "$nqn") ]] && return 0
    x timeout 60 nvme disconnect -n "$nqn" >&2 || fail "nvme disconnect -n $nqn failed"
    for i in $(seq 1 150); do [[ -z $(ctrls_of "$nqn") ]] && return 0; sleep 0.2; done
    fail "controller of $nqn still present 30s after nvme disconnect"
}

file_sum() { sha256sum < "$1" | cut -d' ' -f1; }
# put_pattern FILE DEV OFFSET_MIB: writes FILE there, O_DIRECT, then a flush.
put_pattern() {
    x dd if="$1" of="/dev/$2" bs=1M seek="$3" oflag=direct conv=fsync status=none \
        || fail "writing $1 to /dev/$2 at $3 MiB failed"
}
make_pattern() { [[ -s $STATE/$1 ]] || dd if=/dev/urandom of="$STATE/$1" bs=1M count="$2" status=none || fail "cannot make $1"; }

# ---------------------------------------------------------------------------------------
# scenarios

sc_node_serve() {
    server_start
    x xt status || fail "xatastor-target status failed"
    local js backend prefix listen impl
    js=$(xt --json status) || fail "status --json failed"
    echo "$js"
    backend=$(json_get backend <<< "$js")
    prefix=$(json_get nqn_prefix <<< "$js")
    listen=$(json_get listen <<< "$js")
    [[ $backend == zvol* ]] || fail "status: backend is '$backend', expected zvol:$DS"
    [[ $listen == "127.0.0.1:$PORT" ]] || fail "status: listen is '$listen', expected 127.0.0.1:$PORT"
    [[ $prefix == nqn.* ]] || fail "status: nqn_prefix '$prefix' is not an NQN"
    [[ ${E2E_KERNEL:-6.1} != 6.1 ]] || grep -qw hardened_usercopy=off /proc/cmdline \
        || log "WARNING: hardened_usercopy is on with kernel 6.1 (see the header): a kernel BUG in the server's receive path is possible"
    impl=$(sed 's/\x1b\[[0-9;]*m//g' "$SERVER_LOG" | sed -n 's/.*ZFS control path.*implementation=\([^ ]*\).*/\1/p' | tail -n1)
    info "backend=$backend nqn_prefix=$prefix zfs_control_path=${impl:-?} zfs=$(cat /sys/module/zfs/version) hostnqn=$HOSTNQN"
}

sc_node_create_connect() {
    ensure_volume v1 512MiB
    # A volume of another host: discovery must not show it to this one.
    if ! xt volume show other > /dev/null 2>&1; then
        x xt volume create other --size 512MiB --allow-host "$OTHER_HOSTNQN" || fail "volume create other failed"
    fi
    x xt volume show v1 || fail "volume show v1 failed"
    [[ $(zfs_num volsize "$DS/v1") == $(( 512 << 20 )) ]] || fail "zvol $DS/v1 has volsize $(zfs_num volsize "$DS/v1"), expected 512 MiB"
    x zfs get -H volsize,volblocksize,compression,refreservation "$DS/v1"
    # What the node should list for this host: the volumes that allow it.
    local expected listed rc
    expected=$(xt --json volume list | python3 -c '
import json, sys
h = sys.argv[1]
print("\n".join(sorted(v["nqn"] for v in json.load(sys.stdin) if v.get("allow_any_host") or h in v.get("allowed_hosts", []))))' "$HOSTNQN")
    need_nvme_tcp
    x timeout 60 nvme discover -t tcp -a 127.0.0.1 -s "$PORT" > "$STATE/discover.out" 2>&1
    rc=$?
    cat "$STATE/discover.out"
    [[ $rc == 0 ]] || fail "nvme discover failed (rc=$rc): $(tail -n 2 "$STATE/discover.out" | one_line)"
    listed=$(awk '/^subtype:/ {sub(/^subtype: */, ""); st = $0} /^subnqn:/ {if (st == "nvme subsystem") print $2}' "$STATE/discover.out" | sort)
    log "expected: $(echo $expected); listed: $(echo $listed)"
    [[ -n $listed && $listed == "$expected" ]] || fail "nvme discover lists [$(echo $listed)], expected this host's volumes [$(echo $expected)]"
    grep -qF "$(vol_get other nqn)" "$STATE/discover.out" && fail "nvme discover lists the other host's volume"
    # The exact connect line (nothing added).
    disconnect_nqn "$(vol_get v1 nqn)"
    local dev bytes
    dev=$(connect_vol v1) || exit 1
    log "v1 is /dev/$dev"
    x nvme list
    bytes=$(blockdev --getsize64 "/dev/$dev") || fail "blockdev --getsize64 /dev/$dev failed"
    (( bytes == 512 << 20 )) || fail "/dev/$dev is $bytes bytes, expected 512 MiB"
    [[ $(vol_get v1 active) == true ]] || fail "volume show v1: not active while a host is connected"
    fio_verify "$dev" 16k 32m
    fio_verify "$dev" 4k 8m
    x xt volume show v1
}

# Make sure v1@s1 and its clone c1 exist (for scenarios run alone).
ensure_clone() {
    ensure_volume v1 512MiB
    xt --json volume show v1 | json_get snapshots | grep -qx s1 || x xt snapshot create v1@s1 >&2 || fail "snapshot create v1@s1 failed"
    xt volume show c1 > /dev/null 2>&1 || x xt volume clone v1@s1 c1 --allow-host "$HOSTNQN" >&2 || fail "volume clone v1@s1 c1 failed"
}

sc_node_snapshot_clone() {
    ensure_volume v1 512MiB
    local dev cdev sum_a sum_b origin
    dev=$(connect_vol v1) || exit 1
    make_pattern pat-a 8
    make_pattern pat-b 8
    sum_a=$(file_sum "$STATE/pat-a")
    sum_b=$(file_sum "$STATE/pat-b")
    # Start from scratch when re-run.
    if xt volume show c1 > /dev/null 2>&1; then
        disconnect_nqn "$(vol_get c1 nqn)"
        x xt volume delete c1 --force || fail "cleanup: volume delete c1 failed"
    fi
    if xt --json volume show v1 | json_get snapshots | grep -qx s1; then
        x xt snapshot delete v1@s1 || fail "cleanup: snapshot delete v1@s1 failed"
    fi
    put_pattern "$STATE/pat-a" "$dev" 96
    x xt snapshot create v1@s1 || fail "snapshot create v1@s1 failed"
    x xt snapshot list v1 || fail "snapshot list v1 failed"
    xt snapshot list v1 | grep -q 'v1@s1' || fail "snapshot list v1 does not show v1@s1"
    zfs list -H -t snapshot "$DS/v1@s1" > /dev/null || fail "ZFS has no snapshot $DS/v1@s1"
    put_pattern "$STATE/pat-b" "$dev" 96
    x xt volume clone v1@s1 c1 --allow-host "$HOSTNQN" || fail "volume clone v1@s1 c1 failed"
    x xt volume show c1
    [[ $(vol_get c1 origin) == "v1@s1" ]] || fail "volume show c1: origin is '$(vol_get c1 origin)', expected v1@s1"
    cdev=$(connect_vol c1 "${FAST_LOSS[@]}") || exit 1
    log "clone c1 is /dev/$cdev, v1 is /dev/$dev"
    [[ $(blockdev --getsize64 "/dev/$cdev") == $(vol_get c1 size_bytes) ]] \
        || fail "/dev/$cdev is $(blockdev --getsize64 "/dev/$cdev") bytes, volume show c1 says $(vol_get c1 size_bytes)"
    local c v
    c=$(dev_sum "/dev/$cdev" 96 8)
    v=$(dev_sum "/dev/$dev" 96 8)
    log "pattern A $sum_a, B $sum_b; c1@96MiB $c; v1@96MiB $v"
    [[ $c == "$sum_a" ]] || fail "the clone c1 does not hold the data written before the snapshot"
    [[ $v == "$sum_b" ]] || fail "v1 does not hold the data written after the snapshot"
    x zfs list -t all -o name,used,referenced,origin -r "$DS"
    origin=$(zfs get -H -o value origin "$DS/c1")
    [[ $origin == "$DS/v1@s1" ]] || fail "zfs: the origin of $DS/c1 is '$origin', expected $DS/v1@s1"
}

sc_node_discard() {
    ensure_volume d1 1GiB --compression off
    local dev zd used0 used1 zused0 zused1 freed pid w0 w1 t0
    [[ $(zfs get -H -o value compression "$DS/d1") == off ]] || fail "$DS/d1 has compression $(zfs get -H -o value compression "$DS/d1"), expected off"
    dev=$(connect_vol d1) || exit 1
    zd=$(basename "$(readlink -f "/dev/zvol/$DS/d1")")
    log "nvme $dev: discard_max_bytes=$(cat /sys/block/$dev/queue/discard_max_bytes) max_discard_segments=$(cat /sys/block/$dev/queue/max_discard_segments); zvol $zd: discard_max_bytes=$(cat /sys/block/$zd/queue/discard_max_bytes 2>/dev/null)"
    [[ $(cat "/sys/block/$dev/queue/discard_max_bytes") -gt 0 ]] || fail "/dev/$dev does not support discard (discard_max_bytes=0)"
    x dd if=/dev/urandom of="/dev/$dev" bs=1M count="$DISCARD_MIB" oflag=direct conv=fsync status=none \
        || fail "writing $DISCARD_MIB MiB to /dev/$dev failed"
    pool_sync
    used0=$(vol_get d1 used_bytes)
    zused0=$(zfs_num used "$DS/d1")
    log "after writing $DISCARD_MIB MiB: volume show used_bytes=$used0, zfs used=$zused0"
    (( used0 >= (DISCARD_MIB - 10) << 20 )) || fail "d1 uses only $(mib "$used0") after writing $DISCARD_MIB MiB"
    pid=$(server_pid)
    w0=$(awk '/^wchar:/ {print $2}' "/proc/$pid/io")
    t0=$(now)
    x timeout 300 blkdiscard -o 0 -l $(( DISCARD_MIB << 20 )) "/dev/$dev" || fail "blkdiscard of $DISCARD_MIB MiB on /dev/$dev failed (rc=$?)"
    log "blkdiscard took $(secs_since "$t0")s"
    w1=$(awk '/^wchar:/ {print $2}' "/proc/$pid/io")
    pool_sync
    pool_sync # frees are accounted when their txg syncs
    used1=$(vol_get d1 used_bytes)
    zused1=$(zfs_num used "$DS/d1")
    freed=$(( used0 - used1 ))
    x xt volume show d1
    info "discard-freed=$freed bytes ($(mib "$freed")) of $DISCARD_MIB MiB written; volume show used_bytes $used0 -> $used1; zfs used $zused0 -> $zused1; compression=off; server wrote $(( w1 - w0 )) bytes (wchar) during the discard"
    cmp -n $(( 4 << 20 )) <(dd if="/dev/$dev" bs=1M count=4 iflag=direct status=none) /dev/zero \
        || fail "the first 4 MiB do not read as zeros after blkdiscard"
    (( freed >= DISCARD_MIN_FREED_MIB << 20 )) \
        || fail "blkdiscard of $DISCARD_MIB MiB through NVMe freed only $(mib "$freed") (used_bytes $used0 -> $used1; the server wrote $(mib $(( w1 - w0 ))) meanwhile)"
}

sc_node_resize() {
    ensure_volume v1 512MiB
    local dev size0 big=$(( 1 << 30 )) ctrl cntlid0 i got=""
    dev=$(connect_vol v1) || exit 1
    size0=$(blockdev --getsize64 "/dev/$dev")
    if (( size0 != 512 << 20 )); then
        fail "/dev/$dev is $size0 bytes before the resize, expected 512 MiB (v1 was resized before?)"
    fi
    ctrl=$(ctrls_of "$(vol_get v1 nqn)" | head -n1)
    cntlid0=$(cat "/sys/class/nvme/$ctrl/cntlid")
    dmesg | wc -l > "$STATE/dmesg.mark"
    local t0
    t0=$(now)
    x xt volume resize v1 1GiB || fail "volume resize v1 1GiB failed"
    [[ $(zfs_num volsize "$DS/v1") == "$big" ]] || fail "zfs: volsize of $DS/v1 is $(zfs_num volsize "$DS/v1") after the resize"
    for i in $(seq 1 $(( RESIZE_WAIT_S * 5 ))); do
        [[ $(blockdev --getsize64 "/dev/$dev") == "$big" ]] && { got=$(secs_since "$t0"); break; }
        sleep 0.2
    done
    tail -n +"$(( $(cat "$STATE/dmesg.mark") + 1 ))" < <(dmesg) | grep -i nvme
    [[ -n $got ]] || fail "/dev/$dev still has $(blockdev --getsize64 "/dev/$dev") bytes ${RESIZE_WAIT_S}s after 'volume resize v1 1GiB' (volume show size_bytes: $(vol_get v1 size_bytes))"
    log "/dev/$dev is 1 GiB ${got}s after the resize command"
    [[ $(ctrls_of "$(vol_get v1 nqn)" | head -n1) == "$ctrl" && $(cat "/sys/class/nvme/$ctrl/cntlid") == "$cntlid0" ]] \
        || fail "the controller changed during the resize (reconnect?)"
    [[ $(cat "/sys/class/nvme/$ctrl/state") == live ]] || fail "controller $ctrl is $(cat "/sys/class/nvme/$ctrl/state") after the resize"
    [[ $(vol_get v1 size_bytes) == "$big" ]] || fail "volume show v1: size_bytes $(vol_get v1 size_bytes)"
    info "resize-seen-after=${got}s (same controller $ctrl cntlid $cntlid0)"
    make_pattern pat-r 2
    put_pattern "$STATE/pat-r" "$dev" 1022
    [[ $(dev_sum "/dev/$dev" 1022 2) == $(file_sum "$STATE/pat-r") ]] || fail "data beyond the old end reads back differently"
}

sc_node_delete() {
    ensure_clone
    local nqn dev out rc i t0
    nqn=$(vol_get c1 nqn)
    dev=$(connect_vol c1 "${FAST_LOSS[@]}") || exit 1
    log "c1 is /dev/$dev ($nqn)"
    out=$(xt volume delete c1 2>&1)
    rc=$?
    log "volume delete c1 (connected): rc=$rc: $out"
    [[ $rc != 0 ]] || fail "volume delete c1 succeeded while a host was connected"
    grep -qi 'connected controller' <<< "$out" || fail "volume delete c1 (connected) failed without a 'connected controller' message: $out"
    zfs list -H "$DS/c1" > /dev/null 2>&1 || fail "the refused delete destroyed $DS/c1 anyway"
    xt volume show c1 > /dev/null || fail "the refused delete removed c1 from the catalog"
    [[ -n $(ctrls_of "$nqn") && $(cat "/sys/class/nvme/$(ctrls_of "$nqn" | head -n1)/state") == live ]] \
        || fail "the host's controller of c1 is not live after the refused delete"
    dd if="/dev/$dev" of=/dev/null bs=1M count=1 iflag=direct status=none || fail "c1 cannot be read after the refused delete"
    t0=$(now)
    x xt volume delete c1 --force || fail "volume delete c1 --force failed"
    # The namespace is taken away from the host before its connections are cut: it drops the block
    # device at once; its reconnect gets a controller without namespaces (so it stops retrying),
    # which nvme disconnect removes.
    for i in $(seq 1 100); do [[ -b /dev/$dev ]] || break; sleep 0.05; done
    [[ -b /dev/$dev ]] && fail "/dev/$dev still exists $(secs_since "$t0")s after volume delete --force"
    info "host-device-gone-after=$(secs_since "$t0")s"
    disconnect_nqn "$nqn"
    zfs list -H "$DS/c1" > /dev/null 2>&1 && fail "$DS/c1 still exists in ZFS after volume delete --force"
    xt volume show c1 > /dev/null 2>&1 && fail "c1 is still in the catalog after volume delete --force"
    catalog_volumes | grep -qx c1 && fail "volume list still shows c1"
    zfs list -H -t snapshot "$DS/v1@s1" > /dev/null || fail "deleting the clone destroyed its origin snapshot v1@s1"
    x zfs list -t all -o name,used,origin -r "$DS"
}

# ---------------------------------------------------------------------------------------
# PostgreSQL on a volume, branched with a snapshot + clone while it runs.

PG_BIN=/usr/lib/postgresql/15/bin
PG_TIMEOUT=900

# pg_* INSTANCE ...: instance "main" (volume pg, port 5432) or "branch" (its clone pgc, 5433).
pg_data() { echo "$MNT/$1/pgdata"; }
pg_sock() { echo "$STATE/pgsock-$1"; }
pg_port() { [[ $1 == main ]] && echo 5432 || echo 5433; }
pg_log() { echo "$STATE/postgres-$1.log"; }
pg_run() { local t=$1 p=$2; shift 2; x timeout -k 5 "$t" runuser -u postgres -- "$PG_BIN/$p" "$@"; }
pg_sql() { timeout -k 5 120 runuser -u postgres -- "$PG_BIN/psql" -h "$(pg_sock "$1")" -p "$(pg_port "$1")" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$2"; }
pg_fail() {
    local i
    for i in main branch; do
        [[ -e $(pg_log $i) ]] || continue
        echo "===== $(pg_log $i) ====="; cat "$(pg_log $i)"; echo "===== end ====="
    done
    fail "$* [main log: $(tail -n 3 "$(pg_log main)" 2>/dev/null | one_line)] [branch log: $(tail -n 3 "$(pg_log branch)" 2>/dev/null | one_line)]"
}
pg_stop() {
    local i=$1
    [[ -f $(pg_data "$i")/postmaster.pid ]] || return 0
    pg_run 130 pg_ctl stop -D "$(pg_data "$i")" -m fast -w -t 120
}
pg_start() {
    local i=$1
    mkdir -p "$(pg_sock "$i")" && chown postgres:postgres "$(pg_sock "$i")" || fail "cannot create $(pg_sock "$i")"
    touch "$(pg_log "$i")" && chown postgres:postgres "$(pg_log "$i")"
    pg_run 200 pg_ctl start -D "$(pg_data "$i")" -l "$(pg_log "$i")" -w -t 180 \
        -o "-p $(pg_port "$i") -k $(pg_sock "$i")" || pg_fail "pg_ctl start ($i) failed"
}
pg_cleanup() {
    local i
    for i in branch main; do
        if [[ -f $(pg_data "$i")/postmaster.pid ]]; then
            timeout -k 5 40 runuser -u postgres -- "$PG_BIN/pg_ctl" stop -D "$(pg_data "$i")" -m immediate -w -t 30
        fi
    done
    pkill -KILL -u postgres 2>/dev/null
    for i in branch main; do
        if mountpoint -q "$MNT/$i"; then timeout 60 umount "$MNT/$i" || umount -l "$MNT/$i"; fi
    done
    return 0
}
# pg_state INSTANCE: "count sum md5" of pgbench_accounts.
pg_state() {
    pg_sql "$1" "SELECT count(*) || ' ' || sum(abalance) || ' ' || md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts"
}

sc_node_postgres_branch() {
    [[ -x $PG_BIN/postgres ]] || fail "$PG_BIN/postgres missing from the image"
    ensure_volume pg 1GiB --compression lz4
    trap pg_cleanup EXIT
    pg_cleanup
    mountpoint -q /dev/shm || x mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm || fail "cannot mount /dev/shm"
    local dev cdev rc t0 state0 state_clone state_main2 state_clone2 ratio
    # Start from scratch when re-run.
    if xt volume show pgc > /dev/null 2>&1; then
        disconnect_nqn "$(vol_get pgc nqn)"
        x xt volume delete pgc --force || fail "cleanup: volume delete pgc failed"
    fi
    xt --json volume show pg | json_get snapshots | grep -qx branch && { x xt snapshot delete pg@branch || fail "cleanup: snapshot delete pg@branch failed"; }
    dev=$(connect_vol pg) || exit 1
    mkdir -p "$MNT/main" "$MNT/branch"
    # -K: no discard of the whole namespace first (it costs minutes under TCG; node-discard covers it).
    x mkfs.xfs -f -q -K "/dev/$dev" || fail "mkfs.xfs /dev/$dev failed"
    x mount -t xfs "/dev/$dev" "$MNT/main" || fail "mount /dev/$dev failed"
    mkdir -p "$(pg_data main)" && chown postgres:postgres "$(pg_data main)" && chmod 700 "$(pg_data main)" || fail "cannot create $(pg_data main)"
    pg_run "$PG_TIMEOUT" initdb -D "$(pg_data main)" -U postgres -A trust -E UTF8 --no-locale --no-instructions \
        > "$STATE/initdb.out" 2>&1
    rc=$?
    cat "$STATE/initdb.out"
    [[ $rc == 0 ]] || fail "initdb failed (rc=$rc): $(tail -n 3 "$STATE/initdb.out" | one_line)"
    echo "listen_addresses = ''" >> "$(pg_data main)/postgresql.conf" || fail "cannot write postgresql.conf"
    pg_start main
    t0=$(now)
    pg_run "$PG_TIMEOUT" pgbench -h "$(pg_sock main)" -p 5432 -i -s "$PG_SCALE" postgres > "$STATE/pgbench-i.out" 2>&1
    rc=$?
    cat "$STATE/pgbench-i.out"
    [[ $rc == 0 ]] || pg_fail "pgbench -i -s $PG_SCALE failed (rc=$rc): $(tail -n 2 "$STATE/pgbench-i.out" | one_line)"
    log "pgbench -i -s $PG_SCALE took $(secs_since "$t0")s"
    # Some transactions, so that the balances are not all zero.
    pg_run 300 pgbench -h "$(pg_sock main)" -p 5432 -c 2 -j 2 -T 5 postgres > "$STATE/pgbench-t.out" 2>&1
    rc=$?
    cat "$STATE/pgbench-t.out"
    [[ $rc == 0 ]] || pg_fail "pgbench -T 5 failed (rc=$rc): $(tail -n 2 "$STATE/pgbench-t.out" | one_line)"
    pg_sql main 'CHECKPOINT' || pg_fail "CHECKPOINT failed"
    state0=$(pg_state main) || pg_fail "reading pgbench_accounts failed"
    log "main at the snapshot: count sum md5 = $state0"
    [[ ${state0%% *} == $(( PG_SCALE * 100000 )) ]] || pg_fail "pgbench_accounts has ${state0%% *} rows, expected $(( PG_SCALE * 100000 ))"
    # The branch: a snapshot while PostgreSQL runs (crash-consistent), a clone of it.
    t0=$(now)
    x xt snapshot create pg@branch || pg_fail "snapshot create pg@branch failed (postgres running)"
    log "snapshot took $(secs_since "$t0")s"
    x xt volume clone pg@branch pgc --allow-host "$HOSTNQN" || pg_fail "volume clone pg@branch pgc failed"
    cdev=$(connect_vol pgc "${FAST_LOSS[@]}") || exit 1
    log "clone pgc is /dev/$cdev"
    # Same XFS UUID as the origin's: nouuid. The log is replayed (it was mounted at the snapshot).
    x mount -t xfs -o nouuid "/dev/$cdev" "$MNT/branch" || pg_fail "mount -o nouuid /dev/$cdev failed"
    # The clone's lock file names the running main postmaster; a copied data directory drops it.
    x rm -f "$(pg_data branch)/postmaster.pid"
    pg_start branch
    grep -iE 'not properly shut down|redo|recovery' "$(pg_log branch)" | head -n 5
    state_clone=$(pg_sql branch "SELECT 1" > /dev/null && pg_state branch) || pg_fail "reading pgbench_accounts on the branch failed"
    log "branch after start: $state_clone"
    [[ $state_clone == "$state0" ]] || pg_fail "the branch has count/sum/md5 '$state_clone', main had '$state0' at the snapshot"
    # Writes on the branch do not reach main.
    pg_sql branch "UPDATE pgbench_accounts SET abalance = abalance + 1000 WHERE aid <= 1000" || pg_fail "UPDATE on the branch failed"
    pg_sql branch 'CHECKPOINT' || pg_fail "CHECKPOINT on the branch failed"
    state_clone2=$(pg_state branch) || pg_fail "reading the branch failed"
    state_main2=$(pg_state main) || pg_fail "reading main failed"
    log "after the update on the branch: branch $state_clone2, main $state_main2"
    [[ $state_clone2 != "$state0" ]] || pg_fail "the UPDATE on the branch changed nothing"
    [[ $state_main2 == "$state0" ]] || pg_fail "main changed ('$state0' -> '$state_main2') after writing on the branch"
    pg_stop branch || pg_fail "pg_ctl stop (branch) failed"
    pg_stop main || pg_fail "pg_ctl stop (main) failed"
    x umount "$MNT/branch" || fail "umount branch failed"
    x umount "$MNT/main" || fail "umount main failed"
    pool_sync
    x xt volume show pg
    x xt volume show pgc
    ratio=$(vol_get pg compress_ratio)
    info "compress_ratio=$ratio (pg: volume show used_bytes=$(vol_get pg used_bytes) logical_used_bytes=$(vol_get pg logical_used_bytes); zfs compressratio=$(zfs get -H -o value compressratio "$DS/pg")); clone pgc used_bytes=$(vol_get pgc used_bytes); pgbench -i -s $PG_SCALE, lz4"
    awk -v r="$ratio" 'BEGIN {exit !(r + 0 > 1.0)}' || fail "compress_ratio of pg is $ratio with lz4 (expected > 1)"
}

sc_node_restart() {
    ensure_volume v1 512MiB
    local dev nqn pid rc before after i ctrl how
    dev=$(connect_vol v1) || exit 1
    nqn=$(vol_get v1 nqn)
    make_pattern pat-p 4
    put_pattern "$STATE/pat-p" "$dev" 300
    before=$(catalog_volumes)
    log "volumes before: $(echo $before)"
    # 1. SIGTERM: a clean shutdown.
    rc=$(server_stop TERM) || exit 1
    grep 'shutting down' "$SERVER_LOG" | tail -n1
    [[ $rc == 0 ]] || { server_log_tail 20; fail "xatastor-target exited with status $rc after SIGTERM, expected 0"; }
    server_start
    after=$(catalog_volumes)
    [[ $after == "$before" ]] || fail "after the restart, volume list shows [$(echo $after)], before [$(echo $before)]"
    # The kernel reconnects by itself (reconnect delay 10 s by default); else connect anew.
    ctrl=$(ctrls_of "$nqn" | head -n1)
    how=""
    for i in $(seq 1 225); do
        [[ -n $ctrl && $(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null) == live ]] && { how="reconnected by itself"; break; }
        sleep 0.2
    done
    if [[ -z $how ]]; then
        log "controller ${ctrl:-none} is $(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null) 45s after the restart; connecting anew"
        [[ -n $ctrl ]] && timeout 60 nvme disconnect -d "$ctrl"
        how="connected anew"
    fi
    dev=$(connect_vol v1) || exit 1
    [[ $(dev_sum "/dev/$dev" 300 4) == $(file_sum "$STATE/pat-p") ]] || fail "v1's data differs after the SIGTERM restart ($how)"
    info "sigterm-restart: exit status 0, host $how"
    # 2. SIGKILL: no shutdown at all; the catalog and ZFS must still agree.
    rc=$(server_stop KILL) || exit 1
    log "status after SIGKILL: $rc"
    [[ $rc == 137 ]] || fail "xatastor-target exited with $rc after SIGKILL?"
    [[ -e $DATA/admin.sock ]] && log "a stale $DATA/admin.sock is left behind; the new server must take it over"
    server_start
    x xt status || fail "status after the SIGKILL restart failed"
    after=$(catalog_volumes)
    [[ $after == "$before" ]] || fail "after kill -9 and restart, volume list shows [$(echo $after)], before [$(echo $before)]"
    [[ $after == "$(zfs_volumes)" ]] || fail "volume list [$(echo $after)] and zfs list [$(echo $(zfs_volumes))] disagree"
    [[ $(catalog_snapshots) == "$(zfs_snapshots)" ]] || fail "snapshots in the catalog [$(echo $(catalog_snapshots))] and in ZFS [$(echo $(zfs_snapshots))] disagree"
    ctrl=$(ctrls_of "$nqn" | head -n1)
    how=""
    for i in $(seq 1 225); do
        [[ -n $ctrl && $(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null) == live ]] && { how="reconnected by itself"; break; }
        sleep 0.2
    done
    if [[ -z $how ]]; then
        [[ -n $ctrl ]] && timeout 60 nvme disconnect -d "$ctrl"
        how="connected anew"
    fi
    dev=$(connect_vol v1) || exit 1
    [[ $(dev_sum "/dev/$dev" 300 4) == $(file_sum "$STATE/pat-p") ]] || fail "v1's data differs after the SIGKILL restart ($how)"
    info "sigkill-restart: host $how; volumes [$(echo $after)] = zfs; snapshots [$(echo $(zfs_snapshots))]"
}

# node-upgrade: zero-downtime upgrades under load. fio random write + crc32c verify (O_DIRECT,
# QD16, 4 KiB, libaio, time-based) runs on volume u1 through the guest's kernel initiator while the
# node is upgraded UPGRADES times in a row, each time to a different file: "a freshly built
# binary" here is a copy of the shipped xatastor-target with a unique trailer appended (ignored by
# the loader: a different file, inode and sha256, so the new process really execs a new file; the
# code is the same build). Upgrades 1, 2, 3 and 5 use `upgrade --binary PATH`; upgrade 4 is a
# SIGHUP after a new copy was renamed over the running binary's path (what a package manager
# does; SIGHUP starts the binary the node was started from). Pass/fail: fio exits 0 with no error
# and no verify failure, every upgrade succeeds (new pid, old one exits, 0 connections closed), the
# kernel logs nothing about the controller (no reset, reconnect, timeout), and the controller is
# the same (same nvmeX, same cntlid, live). Measured (INFO, not asserted): per upgrade, the node's
# own pause/quiesce figures, the longest latency of an I/O completing during the upgrade (+1 s)
# and the longest gap between two completions there, from fio's per-I/O latency log.
sc_node_upgrade() {
    ensure_volume u1 512MiB
    local dev nqn ctrl cntlid mark bin src i path via pid0 pid new t0 t1 out rc fiopid js lines line cur
    dev=$(connect_vol u1) || exit 1
    nqn=$(vol_get u1 nqn)
    ctrl=$(ctrls_of "$nqn" | head -n1)
    [[ -n $ctrl ]] || fail "no controller for $nqn after connect"
    cntlid=$(cat "/sys/class/nvme/$ctrl/cntlid")
    log "u1 is /dev/$dev on $ctrl (cntlid $cntlid)"
    src=$(command -v "$XT") || fail "$XT not in PATH"
    # All copies are made before fio starts (a copy of the ~80 MiB binary, debug info included,
    # takes 7-16 s under TCG on the root disk while fio runs), on the /tmp tmpfs (half the guest's
    # RAM; /run is 10%, too small); each is removed once its process is gone.
    bin=/tmp/xe2e-upgrade-bin
    rm -rf "$bin" "$STATE"/upg_*.log
    mkdir -p "$bin"
    # fresh_copy DEST N: a copy of the shipped binary with a unique trailer, renamed into place.
    fresh_copy() {
        cp "$src" "$1.tmp" && printf '\nxe2e-upgrade-build %s %s\n' "$2" "$(date +%s%N)" >> "$1.tmp" \
            && chmod 755 "$1.tmp" && mv -f "$1.tmp" "$1" || fail "cannot make the upgrade binary $1"
    }
    for i in $(seq 1 "$UPGRADES"); do
        # The SIGHUP one is renamed over the running binary's path when its turn comes.
        if [[ $i == "$UPGRADE_SIGHUP" ]]; then fresh_copy "$bin/next-for-sighup" "$i"; else fresh_copy "$bin/xatastor-target.$i" "$i"; fi
    done
    for path in "$bin"/*; do log "$path: $(stat -c '%s bytes, inode %i' "$path"), ends with '$(tail -n1 "$path")'"; done
    pid0=$(server_pid)
    cur=$src
    pid=$pid0
    local fio_args=(--name=upg --filename="/dev/$dev" --direct=1 --rw=randwrite --bs=4k --size=256m
        --ioengine=libaio --iodepth=16 --time_based --runtime="$UPGRADE_FIO_RUNTIME"
        --verify=crc32c --do_verify=1 --verify_backlog=256 --verify_fatal=1 --verify_state_save=0
        --write_lat_log="$STATE/upg" --log_avg_msec=0 --log_unix_epoch=1)
    make_pattern pat-u 4
    put_pattern "$STATE/pat-u" "$dev" 300
    mark=$(dmesg | wc -l)
    log "+ fio ${fio_args[*]} &"
    timeout "$FIO_TIMEOUT" fio "${fio_args[@]}" > "$STATE/fio-upg.out" 2>&1 &
    fiopid=$!
    # A failing check must not leave fio writing (this runs in the scenario's subshell).
    trap 'kill '"$fiopid"' 2>/dev/null' EXIT
    : > "$STATE/upgrades.txt"
    sleep "$UPGRADE_GAP_S"
    for i in $(seq 1 "$UPGRADES"); do
        kill -0 "$fiopid" 2>/dev/null || { cat "$STATE/fio-upg.out"; fail "fio ended before upgrade $i (raise UPGRADE_FIO_RUNTIME=$UPGRADE_FIO_RUNTIME)"; }
        if [[ $i == "$UPGRADE_SIGHUP" ]]; then
            # The running binary's path, replaced by a new file; SIGHUP starts what is there now.
            path=$(readlink "/proc/$pid/exe")
            path=${path% (deleted)}
            [[ $path == "$bin"/* ]] || fail "upgrade $i: the node (pid $pid) runs $path, not one of the upgrade copies"
            x mv -f "$bin/next-for-sighup" "$path" || fail "cannot rename the new binary over $path"
            via=SIGHUP
            lines=$(wc -l < "$SERVER_LOG")
            t0=$(date +%s%3N)
            x kill -HUP "$pid"
            js=""
            for _ in $(seq 1 600); do
                js=$(tail -n +"$(( lines + 1 ))" "$SERVER_LOG" | sed 's/\x1b\[[0-9;]*m//g' \
                    | sed -n 's/.*upgrade: the new process serves; this one exits.*report=\({.*}\).*/\1/p' | head -n1)
                [[ -n $js ]] && break
                tail -n +"$(( lines + 1 ))" "$SERVER_LOG" | grep -q 'upgrade did not happen' \
                    && { server_log_tail 20; fail "upgrade $i (SIGHUP): $(grep 'upgrade did not happen' "$SERVER_LOG" | tail -n1 | one_line)"; }
                sleep 0.2
            done
            t1=$(date +%s%3N)
            [[ -n $js ]] || { server_log_tail 30; fail "upgrade $i (SIGHUP to pid $pid): no upgrade report in the server log within 120s"; }
            echo "$js"
        else
            path=$bin/xatastor-target.$i
            via=upgrade
            t0=$(date +%s%3N)
            echo "+ $XT --data-dir $DATA --json upgrade --binary $path"
            out=$(xt --json upgrade --binary "$path" 2>&1)
            rc=$?
            t1=$(date +%s%3N)
            echo "$out"
            [[ $rc == 0 ]] || { server_log_tail 30; fail "upgrade $i (--binary $path) failed (rc=$rc): $(one_line <<< "$out")"; }
            js=$out
        fi
        local old closed conns ctrls held pause quiesce
        # One python3 run (each costs most of a second under TCG, and fio is waiting for the next
        # upgrade): the report's fields, from the --json output or the log's report={...}.
        read -r old new closed conns ctrls held pause quiesce < <(python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
d = d.get("upgraded", d)
print(*(d.get(k, "?") for k in ("old_pid", "new_pid", "closed", "connections", "controllers", "held_commands", "pause_ms", "quiesce_ms")))' <<< "$js") \
            || fail "upgrade $i: the report is not JSON: $(one_line <<< "$js")"
        echo "$i $via $t0 $t1 $old $new $conns $ctrls $closed $held $pause $quiesce" >> "$STATE/upgrades.txt"
        [[ $old == "$pid" ]] || fail "upgrade $i: report says old_pid $old, the node was pid $pid"
        [[ -n $new && $new != "$pid" ]] || fail "upgrade $i: new_pid '$new' (old $pid)"
        [[ $closed == 0 ]] || fail "upgrade $i: $closed connection(s) closed instead of handed over"
        (( conns >= 1 && ctrls >= 1 )) || fail "upgrade $i: $conns connection(s), $ctrls controller(s) handed over (u1 is connected)"
        pid_alive "$new" || { server_log_tail 20; fail "upgrade $i: the new process $new is not running"; }
        [[ $(stat -Lc %i "/proc/$new/exe") == $(stat -c %i "$path") ]] \
            || fail "upgrade $i: the new process runs $(readlink "/proc/$new/exe"), not the fresh file $path"
        for _ in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.2; done
        pid_alive "$pid" && fail "upgrade $i: the old process $pid still runs 10s after handing over"
        [[ $cur == "$bin"/* && $cur != "$path" ]] && rm -f "$cur"
        cur=$path
        if [[ $pid == "$pid0" ]]; then
            # The first node was server_start's child: its exit status is seen.
            for _ in $(seq 1 50); do [[ -e $STATE/server.rc ]] && break; sleep 0.2; done
            [[ $(cat "$STATE/server.rc" 2>/dev/null) == 0 ]] || fail "upgrade $i: the old node exited with status '$(cat "$STATE/server.rc" 2>/dev/null)', expected 0"
            rm -f "$STATE/server.rc"
        fi
        echo "$new" > "$STATE/server.pid"
        pid=$new
        [[ $(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null) == live ]] || fail "upgrade $i: $ctrl is '$(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null)', not live"
        log "upgrade $i ($via): pid $old -> $new in $(( t1 - t0 )) ms: $conns connection(s), $ctrls controller(s), $closed closed, $held held; pause ${pause} ms, quiesce ${quiesce} ms"
        sleep "$UPGRADE_GAP_S"
    done
    kill -0 "$fiopid" 2>/dev/null || { cat "$STATE/fio-upg.out"; fail "fio ended before the I/O after the last upgrade (raise UPGRADE_FIO_RUNTIME=$UPGRADE_FIO_RUNTIME)"; }
    wait "$fiopid"
    rc=$?
    cat "$STATE/fio-upg.out"
    x xt status
    # What the kernel logged about u1's controller (nvmeX:, its paths nvmeXcYnZ, nvmeXnY) since
    # fio started: a reset, reconnect, queue timeout or I/O error would be there. Other
    # controllers (scenarios before this one leave volumes connected; after node-restart they
    # reconnect on their own, maybe while this runs) are shown, not judged.
    local kmsg
    dmesg | tail -n +"$(( mark + 1 ))" | grep -iE 'nvme|I/O error' | sed 's/^/kernel since fio started: /'
    kmsg=$(dmesg | tail -n +"$(( mark + 1 ))" | grep -E "(^|[^0-9a-z])$ctrl(c[0-9]+)?(n[0-9]+)?([^0-9]|\$)")
    # Measurements first: they matter most when something failed.
    python3 - "$STATE/upg_lat.1.log" "$STATE/upgrades.txt" > "$STATE/upg-info.txt" <<'PY' || fail "analysing fio's latency log failed"
import sys
comp = []  # (completion time ms since the epoch, latency ms)
for line in open(sys.argv[1]):
    f = line.split(",")
    if len(f) >= 2:
        comp.append((int(f[0]), int(f[1]) / 1e6))  # fio 3: latency in ns
comp.sort()
ups = [l.split() for l in open(sys.argv[2]) if l.strip()]
inside = set()
for u in ups:
    i, via, t0, t1 = u[0], u[1], int(u[2]), int(u[3])
    hi = t1 + 1000
    sel = [k for k, (t, _) in enumerate(comp) if t0 <= t <= hi]
    inside.update(sel)
    prev = [t for t, _ in comp if t < t0]
    times = ([prev[-1]] if prev else []) + [comp[k][0] for k in sel]
    gap = max((b - a for a, b in zip(times, times[1:])), default=0)
    lat = max((comp[k][1] for k in sel), default=0.0)
    print(f"upgrade={i} via={via} pid={u[4]}->{u[5]} handed_over={u[6]}conn/{u[7]}ctrl closed={u[8]} held={u[9]} "
          f"node_pause_ms={float(u[10]):.1f} node_quiesce_ms={float(u[11]):.1f} upgrade_took_ms={t1 - t0} "
          f"max_io_latency_ms={lat:.1f} longest_completion_gap_ms={gap} ios_in_window={len(sel)}")
base = [l for k, (_, l) in enumerate(comp) if k not in inside]
allm = max((l for _, l in comp), default=0.0)
bm = max(base, default=0.0)
p99 = sorted(base)[int(len(base) * 0.99)] if base else 0.0
print(f"summary ios={len(comp)} max_io_latency_ms={allm:.1f} (whole run) outside_upgrades: max_ms={bm:.1f} p99_ms={p99:.1f}")
PY
    while IFS= read -r line; do info "$line"; done < "$STATE/upg-info.txt"
    [[ $rc == 0 ]] || fail "fio randwrite+verify through $UPGRADES upgrades failed (rc=$rc): $(grep -m1 -iE 'verify|bad|error|err=' "$STATE/fio-upg.out" | cut -c1-200)"
    grep -q 'err= 0' "$STATE/fio-upg.out" || fail "fio: no 'err= 0' in fio's report"
    grep -qiE 'verify: bad|bad magic|crc32c: verify failed' "$STATE/fio-upg.out" && fail "fio reported a verify failure"
    [[ -z $kmsg ]] || fail "the guest kernel logged about $ctrl during the upgrades: $(head -n 2 <<< "$kmsg" | one_line)"
    [[ $(ctrls_of "$nqn") == "$ctrl" ]] || fail "controllers of u1 are now [$(ctrls_of "$nqn" | one_line)], before: $ctrl"
    [[ $(cat "/sys/class/nvme/$ctrl/cntlid") == "$cntlid" ]] || fail "$ctrl's cntlid is $(cat "/sys/class/nvme/$ctrl/cntlid"), was $cntlid"
    [[ $(cat "/sys/class/nvme/$ctrl/state") == live ]] || fail "$ctrl is $(cat "/sys/class/nvme/$ctrl/state") after the upgrades"
    local pids
    pids=$(cut -d' ' -f6 "$STATE/upgrades.txt" | sort -u | wc -l)
    (( pids == UPGRADES )) || fail "$pids distinct new pids over $UPGRADES upgrades"
    (( $(grep -c 'handed over to the new process; exiting' "$SERVER_LOG") >= UPGRADES )) \
        || fail "the server log has fewer than $UPGRADES 'handed over ... exiting' lines"
    # What was written before the first upgrade (outside fio's 256 MiB) is still there.
    [[ $(dev_sum "/dev/$dev" 300 4) == $(file_sum "$STATE/pat-u") ]] || fail "the pattern written at 300 MiB before the upgrades differs after them"
    # "issued rwts: total=R,W": R reads are the verify reads (every write but the last batch of
    # fewer than verify_backlog, which the time limit leaves unread).
    info "fio: $(grep -m1 -E '^ *write:' "$STATE/fio-upg.out" | one_line);$(grep -m1 'issued rwts' "$STATE/fio-upg.out" | one_line) (reads = verify reads); writes: $(grep -m1 -E '^ +lat \(' "$STATE/fio-upg.out" | one_line); same $ctrl cntlid=$cntlid, pids $pid0 -> $(cut -d' ' -f6 "$STATE/upgrades.txt" | tr '\n' ' ')"
}

sc_zfs_timing() {
    pool_setup
    command -v zfs_timing > /dev/null || fail "zfs_timing not in PATH (guest-bin)"
    zfs list -H "$POOL/timing" > /dev/null 2>&1 || x zfs create "$POOL/timing" || fail "zfs create $POOL/timing failed"
    local rc n=20 t0
    t0=$(now)
    x timeout 1200 zfs_timing "$POOL/timing" "$n" > "$STATE/timing.out" 2> "$STATE/timing.err"
    rc=$?
    cat "$STATE/timing.out" "$STATE/timing.err"
    log "zfs_timing took $(secs_since "$t0")s"
    local line
    while IFS= read -r line; do
        [[ $line == "| "* && $line != *"----"* ]] && info "$line"
    done < "$STATE/timing.out"
    [[ $rc == 0 ]] || fail "zfs_timing $POOL/timing $n failed (rc=$rc): $(tail -n 3 "$STATE/timing.err" | one_line)"
    grep -q '^| lzc ' "$STATE/timing.out" || fail "zfs_timing has no libzfs_core rows (did libzfs_core load?): $(one_line < "$STATE/timing.err")"
    grep -q '^| zfs-command ' "$STATE/timing.out" || fail "zfs_timing has no zfs-command rows"
    [[ -z $(zfs list -H -o name -r "$POOL/timing" | grep -v "^$POOL/timing\$") ]] || fail "zfs_timing left datasets behind: $(zfs list -H -o name -r "$POOL/timing" | one_line)"
}

# ---------------------------------------------------------------------------------------
# driver

SCENARIOS=(
    node-serve:sc_node_serve
    node-create-connect:sc_node_create_connect
    node-snapshot-clone:sc_node_snapshot_clone
    node-discard:sc_node_discard
    node-resize:sc_node_resize
    node-delete:sc_node_delete
    node-postgres-branch:sc_node_postgres_branch
    node-restart:sc_node_restart
    node-upgrade:sc_node_upgrade
    zfs-timing:sc_zfs_timing
)

selected=()
if [[ -z ${E2E_ONLY:-} ]]; then
    selected=("${SCENARIOS[@]}")
else
    for s in "${SCENARIOS[@]}"; do
        [[ " $E2E_ONLY " == *" ${s%%:*} "* ]] && selected+=("$s")
    done
fi
echo "PLAN ${selected[*]%%:*}" > "$RESULTS"
log "plan: ${selected[*]%%:*} (node: $XT serve --backend zvol:$DS in the guest; host NQN $HOSTNQN)"

# e2e-include: lib/run.sh
run_selected

log "cleanup"
for m in "$MNT"/*; do mountpoint -q "$m" && umount "$m"; done
[[ -e /dev/nvme-fabrics ]] && timeout 60 nvme disconnect-all
if server_running; then
    [[ -S $DATA/admin.sock ]] && { timeout 30 "$XT" --data-dir "$DATA" volume list; timeout 30 "$XT" --data-dir "$DATA" status; }
    kill -TERM "$(server_pid)"
    for _ in $(seq 1 150); do { [[ -e $STATE/server.rc ]] || ! server_running; } && break; sleep 0.2; done
    echo "server exit status after the final SIGTERM: $(cat "$STATE/server.rc" 2>/dev/null || echo 'still running')"
fi
echo "===== $SERVER_LOG ====="
sed 's/\x1b\[[0-9;]*m//g' "$SERVER_LOG" 2>/dev/null
echo "===== end of $SERVER_LOG ====="
if [[ -e /dev/zfs ]]; then
    echo "===== zpool status / zfs list ====="
    zpool status "$POOL"
    zfs list -t all -o name,used,logicalused,referenced,compressratio,volsize,origin -r "$POOL"
fi
echo "===== guest dmesg | grep -iE 'nvme|zfs|spl|zd[0-9]|xfs' ====="
dmesg | grep -iE 'nvme|zfs|spl|zd[0-9]|xfs'
echo "===== end of guest dmesg ====="
exit "$failed"
