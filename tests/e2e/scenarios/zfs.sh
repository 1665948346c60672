#!/bin/bash
# e2e-needs: scratch-disk=4G guest-bin guest-cmdline@6.1=hardened_usercopy=off
#
# ZFS end-to-end scenarios, run INSIDE the guest by /sbin/xe2e-init (tests/e2e/run.sh --suite zfs).
#
# Only the guest has ZFS (the image's zfs-dkms module, built for the guest kernel), so the
# target runs in the guest too: run.sh ships the host-built nvmeof-blocking-target on a
# read-only disk (guest-bin, mounted on /opt/xe2e-bin, in PATH) and attaches a blank 4 GiB
# scratch disk (E2E_SCRATCH_DEV) for the pool. Each zvol is served by its own target process
# (`--file /dev/zvol/POOL/VOL`, one namespace per process) on 127.0.0.1:PORT, and the guest's
# kernel initiator (nvme-tcp, nvme-cli) connects to it over the loopback.
#
# Input (environment, from run.sh's env file and the init):
#   E2E_HOSTNQN E2E_HOSTID   the host identity (the targets allow only it)
#   E2E_SCRATCH_DEV          the blank disk for the pool (set by the init, serial xe2e-scratch)
#   E2E_BIN_DIR              where nvmeof-blocking-target is (set by the init, serial xe2e-bin)
#   E2E_DRIVER               the targets' --driver (default here: io-uring)
#   E2E_ONLY                 optional space-separated list of scenario names to run (may name
#                            the optional ones, e.g. zvol-resize)
#
# Output: "PLAN <names>", then one "PASS <name>" / "FAIL <name>: <reason>" line per scenario,
# "TIME <name> <s>s" and "INFO <name> <key=value...>" lines (measurements) on /dev/ttyS1;
# everything else (commands, their output, target logs, zpool status, dmesg) on the console.
# Scenarios keep going after a failure; each one sets up what it needs (pool, zvol, target,
# connection) idempotently, so it can also run alone (--only).
set -uo pipefail

RESULTS=/dev/ttyS1
STATE=/run/e2e
MNT=/mnt/e2e
mkdir -p "$STATE" "$MNT"

POOL=xe2e
DRIVER=${E2E_DRIVER:-io-uring}
TARGET_BIN=nvmeof-blocking-target
NQN_PREFIX=nqn.2026-01.io.xatastor:zfs
CONNECT_OPTS=(--ctrl-loss-tmo=20 --reconnect-delay=2)
FIO_TIMEOUT=900
# ARC limit in the 2 GiB guest (default: half of RAM), so PostgreSQL and fio have room.
ARC_MAX=$(( 256 << 20 ))
# discard: how much is written, and how much of it must come back as free pool space.
DISCARD_MIB=200
DISCARD_MIN_FREED_MIB=150
# compressratio: pgbench scale and the lowest ratio that passes (pgbench data compresses well).
PG_SCALE=10
PG_MIN_RATIO=1.10
RESIZE_WAIT_S=20

: "${E2E_HOSTNQN:?}" "${E2E_HOSTID:?}"
mkdir -p /etc/nvme
echo "$E2E_HOSTNQN" > /etc/nvme/hostnqn
echo "$E2E_HOSTID" > /etc/nvme/hostid

# e2e-include: lib/common.sh

# ---------------------------------------------------------------------------------------
# ZFS helpers

# e2e-include: lib/zfs.sh

pool_setup() { pool_create; }

# wait_for_path PATH SECONDS
wait_for_path() {
    local i
    for i in $(seq 1 $(( $2 * 5 ))); do [[ -e $1 ]] && return 0; sleep 0.2; done
    return 1
}

# vol_setup NAME ZFS-CREATE-OPTIONS...: the zvol POOL/NAME (created if missing) and its udev link.
vol_setup() {
    local name=$1
    shift
    pool_setup
    if ! zfs list -H "$POOL/$name" > /dev/null 2>&1; then
        x zfs create "$@" "$POOL/$name" || fail "zfs create $* $POOL/$name failed"
    fi
    wait_for_path "/dev/zvol/$POOL/$name" 60 \
        || fail "/dev/zvol/$POOL/$name did not appear within 60s (zd devices: $(ls /dev/zd* 2>/dev/null | tr '\n' ' '))"
}

# ---------------------------------------------------------------------------------------
# targets (inside the guest) and the kernel initiator

# target_setup NAME VOL PORT: nvmeof-blocking-target serving /dev/zvol/POOL/VOL as the only
# namespace of NQN_PREFIX-NAME on 127.0.0.1:PORT (started once; its log is
# STATE/target-NAME.log, its control FIFO STATE/control-NAME.fifo).
target_setup() {
    local name=$1 vol=$2 port=$3 pidf=$STATE/target-$1.pid logf=$STATE/target-$1.log
    if [[ -e $pidf ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; then return 0; fi
    command -v "$TARGET_BIN" > /dev/null || fail "$TARGET_BIN not in PATH (E2E_BIN_DIR='${E2E_BIN_DIR:-}'): run through run.sh (guest-bin)"
    rm -f "$STATE/control-$name.fifo"
    mkfifo "$STATE/control-$name.fifo" || fail "mkfifo failed"
    echo "+ $TARGET_BIN --driver $DRIVER --file /dev/zvol/$POOL/$vol --listen 127.0.0.1:$port --nqn $NQN_PREFIX-$name ... &"
    NO_COLOR=1 setsid "$TARGET_BIN" --driver "$DRIVER" --file "/dev/zvol/$POOL/$vol" --listen "127.0.0.1:$port" \
        --nqn "$NQN_PREFIX-$name" --serial "XSZFS-$name" --host "$E2E_HOSTNQN" --log info \
        --control "$STATE/control-$name.fifo" > "$logf" 2>&1 < /dev/null &
    echo $! > "$pidf"
    local i
    for i in $(seq 1 150); do
        grep -q "^serving $NQN_PREFIX-$name .* on 127\.0\.0\.1:$port\$" "$logf" && break
        kill -0 "$(cat "$pidf")" 2>/dev/null || { cat "$logf"; fail "the target for $POOL/$vol exited at startup: $(tail -n 2 "$logf" | tr '\n' ' ')"; }
        sleep 0.2
    done
    grep -q "^serving " "$logf" || { cat "$logf"; fail "the target for $POOL/$vol did not report 'serving ... on 127.0.0.1:$port' within 30s"; }
    log "target $name (pid $(cat "$pidf")): $(grep -m1 '^serving ' "$logf")"
}

# control NAME COMMAND...: one command to target NAME's control FIFO; prints its reply line.
control() {
    local name=$1 logf=$STATE/target-$1.log n i reply=""
    shift
    n=$(grep -c '^control: ' "$logf")
    echo "$*" > "$STATE/control-$name.fifo"
    for i in $(seq 1 50); do
        reply=$(grep '^control: ' "$logf" | tail -n +$(( n + 1 )) | head -n1)
        [[ -n $reply ]] && break
        sleep 0.1
    done
    echo "${reply:-control: no reply within 5s}"
}

# e2e-include: lib/nvme.sh

# connect_vol NAME: connected to target NAME (reusing a connection); prints the device name.
connect_vol() {
    local nqn=$NQN_PREFIX-$1 port d i
    if d=$(ns_dev_of "$nqn"); then echo "$d"; return 0; fi
    port=$(sed -n "s/^serving $nqn .* on 127\.0\.0\.1:\([0-9]*\)\$/\1/p" "$STATE/target-$1.log" | head -n1)
    [[ -n $port ]] || fail "target $1 is not running"
    need_nvme_tcp
    x timeout 60 nvme connect -t tcp -a 127.0.0.1 -s "$port" -n "$nqn" \
        --hostnqn "$E2E_HOSTNQN" --hostid "$E2E_HOSTID" "${CONNECT_OPTS[@]}" >&2 \
        || fail "nvme connect to $nqn (127.0.0.1:$port) failed (rc=$?)"
    for i in $(seq 1 150); do
        if d=$(ns_dev_of "$nqn"); then echo "$d"; return 0; fi
        sleep 0.2
    done
    fail "namespace block device of $nqn did not appear within 30s after nvme connect"
}

disconnect_vol() {
    local nqn=$NQN_PREFIX-$1 i
    mountpoint -q "$MNT" && umount "$MNT"
    [[ -z $(ctrls_of "$nqn") ]] && return 0
    x timeout 60 nvme disconnect -n "$nqn" || fail "nvme disconnect -n $nqn failed"
    for i in $(seq 1 150); do [[ -z $(ctrls_of "$nqn") ]] && return 0; sleep 0.2; done
    fail "controller of $nqn still present 30s after nvme disconnect"
}

# serve VOL-NAME PORT ZFS-CREATE-OPTIONS...: zvol + target (NAME = the zvol's name) + connection.
serve() {
    local name=$1 port=$2
    shift 2
    # Only the device name goes to stdout (the caller captures it).
    vol_setup "$name" "$@" >&2
    target_setup "$name" "$name" "$port" >&2
    connect_vol "$name"
}

# ---------------------------------------------------------------------------------------
# scenarios

sc_zfs_pool() {
    pool_setup
    x zpool status "$POOL"
    [[ $(zpool list -H -o health "$POOL") == ONLINE ]] || fail "pool $POOL is $(zpool list -H -o health "$POOL"), not ONLINE"
    info "zfs=$(cat /sys/module/zfs/version) spl=$(cat /sys/module/spl/version) kernel=$(uname -r) pool=$(zpool list -Hp -o size "$POOL")B arc_max=$ARC_MAX"
}

# The zvol the NVMe namespace scenarios use: 1 GiB, thin, 16k blocks, lz4.
V1_OPTS=(-s -V 1G -o volblocksize=16k -o compression=lz4)
sc_zvol_create() {
    vol_setup v1 "${V1_OPTS[@]}"
    local bytes
    bytes=$(blockdev --getsize64 "/dev/zvol/$POOL/v1") || fail "blockdev --getsize64 /dev/zvol/$POOL/v1 failed"
    (( bytes == 1 << 30 )) || fail "/dev/zvol/$POOL/v1 is $bytes bytes, expected $(( 1 << 30 ))"
    x zfs get -H volsize,volblocksize,compression,refreservation "$POOL/v1"
    [[ $(zfs get -H -o value volblocksize "$POOL/v1") == 16K ]] || fail "volblocksize is not 16K"
    [[ $(zfs get -H -o value compression "$POOL/v1") == lz4 ]] || fail "compression is not lz4"
    log "/dev/zvol/$POOL/v1 -> $(readlink -f "/dev/zvol/$POOL/v1")"
}

sc_zvol_connect() {
    vol_setup v1 "${V1_OPTS[@]}"
    target_setup v1 v1 4420
    need_nvme_tcp
    x timeout 60 nvme discover -t tcp -a 127.0.0.1 -s 4420 --hostnqn "$E2E_HOSTNQN" --hostid "$E2E_HOSTID" \
        > "$STATE/discover.out" 2>&1
    local rc=$?
    cat "$STATE/discover.out"
    [[ $rc == 0 ]] || fail "nvme discover failed (rc=$rc)"
    grep -q "subnqn: *$NQN_PREFIX-v1\$" "$STATE/discover.out" || fail "discovery log does not list $NQN_PREFIX-v1"
    disconnect_vol v1
    local dev bytes
    dev=$(connect_vol v1) || exit 1
    log "namespace device: /dev/$dev"
    x nvme list
    bytes=$(blockdev --getsize64 "/dev/$dev") || fail "blockdev --getsize64 /dev/$dev failed"
    (( bytes == 1 << 30 )) || fail "/dev/$dev is $bytes bytes, expected the zvol's $(( 1 << 30 ))"
    log "queue: logical_block_size=$(cat /sys/block/$dev/queue/logical_block_size) discard_max_bytes=$(cat /sys/block/$dev/queue/discard_max_bytes)"
}

sc_zvol_fio_verify() {
    local dev
    dev=$(serve v1 4420 "${V1_OPTS[@]}") || exit 1
    fio_verify "$dev" 16k 64m
    fio_verify "$dev" 4k 16m
    x zfs get -H used,logicalused,compressratio "$POOL/v1"
}

# Data written through NVMe before `zfs snapshot` is what a clone of that snapshot, served by a
# second target, returns; data written after it is only on the origin.
sc_zvol_snapshot_clone() {
    local dev cdev sum_a sum_b sum_snap sum_clone sum_clone_pat sum_v1_pat
    dev=$(serve v1 4420 "${V1_OPTS[@]}") || exit 1
    x dd if=/dev/urandom of="$STATE/pat-a" bs=1M count=8 status=none || fail "cannot make pattern A"
    x dd if=/dev/urandom of="$STATE/pat-b" bs=1M count=8 status=none || fail "cannot make pattern B"
    sum_a=$(sha256sum < "$STATE/pat-a" | cut -d' ' -f1)
    sum_b=$(sha256sum < "$STATE/pat-b" | cut -d' ' -f1)
    # Pattern A at 96 MiB, through NVMe, flushed (the target's Flush is an fdatasync of the zvol).
    x dd if="$STATE/pat-a" of="/dev/$dev" bs=1M seek=96 oflag=direct conv=fsync status=none \
        || fail "writing pattern A to /dev/$dev failed"
    zfs list -H -t snapshot "$POOL/v1@s1" > /dev/null 2>&1 && x zfs destroy -R "$POOL/v1@s1"
    x zfs snapshot "$POOL/v1@s1" || fail "zfs snapshot $POOL/v1@s1 failed"
    # After the snapshot, the origin gets pattern B at the same place.
    x dd if="$STATE/pat-b" of="/dev/$dev" bs=1M seek=96 oflag=direct conv=fsync status=none \
        || fail "writing pattern B to /dev/$dev failed"
    x zfs clone "$POOL/v1@s1" "$POOL/c1" || fail "zfs clone $POOL/v1@s1 $POOL/c1 failed"
    wait_for_path "/dev/zvol/$POOL/c1" 60 || fail "/dev/zvol/$POOL/c1 did not appear within 60s"
    target_setup c1 c1 4421
    cdev=$(connect_vol c1) || exit 1
    log "clone $POOL/c1 served as /dev/$cdev, origin $POOL/v1 as /dev/$dev"
    sum_clone_pat=$(dev_sum "/dev/$cdev" 96 8)
    sum_v1_pat=$(dev_sum "/dev/$dev" 96 8)
    log "pattern A $sum_a, B $sum_b; clone@96MiB $sum_clone_pat; origin@96MiB $sum_v1_pat"
    [[ $sum_clone_pat == "$sum_a" ]] || fail "the clone (over NVMe) does not hold the data written before the snapshot"
    [[ $sum_v1_pat == "$sum_b" ]] || fail "the origin (over NVMe) does not hold the data written after the snapshot"
    # The first 128 MiB (fio's data and pattern A) of the clone, over NVMe, equal the snapshot's,
    # read locally from its own zvol device.
    x zfs set snapdev=visible "$POOL/v1" || fail "zfs set snapdev=visible failed"
    wait_for_path "/dev/zvol/$POOL/v1@s1" 60 || fail "/dev/zvol/$POOL/v1@s1 did not appear within 60s"
    sum_snap=$(dev_sum "/dev/zvol/$POOL/v1@s1" 0 128)
    sum_clone=$(dev_sum "/dev/$cdev" 0 128)
    log "first 128 MiB: snapshot (local) $sum_snap, clone (NVMe) $sum_clone"
    [[ -n $sum_snap && $sum_snap == "$sum_clone" ]] || fail "the clone's first 128 MiB over NVMe differ from the snapshot's ($sum_clone vs $sum_snap)"
    x zfs set snapdev=hidden "$POOL/v1"
    x zfs list -t all -o name,used,referenced,origin -r "$POOL"
}

# The control for zvol-discard: a discard issued locally on a zvol (no NVMe, no target) frees its
# blocks; so if zvol-discard fails, the missing link is the target, not ZFS or the kernel.
sc_control_zvol_discard() {
    local zd used0 used1 freed mib=64
    vol_setup l1 -s -V 256M -o volblocksize=16k -o compression=off
    zd=$(basename "$(readlink -f "/dev/zvol/$POOL/l1")")
    x dd if=/dev/urandom of="/dev/zvol/$POOL/l1" bs=1M count=$mib oflag=direct conv=fsync status=none \
        || fail "writing $mib MiB to /dev/zvol/$POOL/l1 failed"
    pool_sync
    used0=$(zfs_num used "$POOL/l1")
    x blkdiscard "/dev/zvol/$POOL/l1" || fail "blkdiscard /dev/zvol/$POOL/l1 (local) failed"
    pool_sync
    pool_sync
    used1=$(zfs_num used "$POOL/l1")
    freed=$(( used0 - used1 ))
    info "local-discard-freed=$freed bytes ($(mib "$freed")) of $mib MiB written to $zd directly; used $used0 -> $used1"
    (( freed >= (mib * 3 / 4) << 20 )) || fail "a local blkdiscard of $zd freed only $(mib "$freed") of $mib MiB"
}

# NVMe Dataset Management deallocate (blkdiscard on the namespace) must free the zvol's blocks.
# compression=off on purpose: with compression on, ZFS does not store all-zero blocks, so a
# target that wrote zeros instead of deallocating would free the space too and pass.
sc_zvol_discard() {
    local dev zd used0 used1 alloc0 alloc1 freed pid w0 w1 wrote
    dev=$(serve d1 4422 -s -V 1G -o volblocksize=16k -o compression=off) || exit 1
    zd=$(basename "$(readlink -f "/dev/zvol/$POOL/d1")")
    log "zvol $zd: discard_max_bytes=$(cat /sys/block/$zd/queue/discard_max_bytes) discard_granularity=$(cat /sys/block/$zd/queue/discard_granularity) write_zeroes_max_bytes=$(cat /sys/block/$zd/queue/write_zeroes_max_bytes)"
    log "nvme $dev: discard_max_bytes=$(cat /sys/block/$dev/queue/discard_max_bytes) max_discard_segments=$(cat /sys/block/$dev/queue/max_discard_segments)"
    x dd if=/dev/urandom of="/dev/$dev" bs=1M count="$DISCARD_MIB" oflag=direct conv=fsync status=none \
        || fail "writing $DISCARD_MIB MiB to /dev/$dev failed"
    pool_sync
    used0=$(zfs_num used "$POOL/d1")
    alloc0=$(zpool list -Hp -o alloc "$POOL")
    log "after writing $DISCARD_MIB MiB: $POOL/d1 used $used0 ($(mib "$used0")), pool alloc $alloc0"
    (( used0 >= (DISCARD_MIB - 10) << 20 )) || fail "$POOL/d1 uses only $(mib "$used0") after writing $DISCARD_MIB MiB"
    local t0
    # What the target process itself writes (write(2)-family bytes, /proc/PID/io wchar) while
    # it handles the deallocate: ~0 for a real discard, ~DISCARD_MIB if it writes zeros instead.
    pid=$(cat "$STATE/target-d1.pid")
    w0=$(awk '/^wchar:/ {print $2}' "/proc/$pid/io")
    t0=$(now)
    x timeout 300 blkdiscard -o 0 -l $(( DISCARD_MIB << 20 )) "/dev/$dev" || fail "blkdiscard of $DISCARD_MIB MiB on /dev/$dev failed (rc=$?)"
    log "blkdiscard took $(secs_since "$t0")s"
    w1=$(awk '/^wchar:/ {print $2}' "/proc/$pid/io")
    wrote=$(( w1 - w0 ))
    log "the target wrote $wrote bytes ($(mib "$wrote")) with write(2)-family calls during the blkdiscard"
    pool_sync
    pool_sync # frees are accounted when their txg syncs
    used1=$(zfs_num used "$POOL/d1")
    alloc1=$(zpool list -Hp -o alloc "$POOL")
    freed=$(( used0 - used1 ))
    log "after blkdiscard: $POOL/d1 used $used1 ($(mib "$used1")), pool alloc $alloc1"
    info "discard-freed=$freed bytes ($(mib "$freed")) of ${DISCARD_MIB} MiB written; zvol used $used0 -> $used1; pool alloc $alloc0 -> $alloc1; compression=off; target wrote $wrote bytes during the discard"
    # Deallocated blocks read as zeros (the target advertises it).
    cmp -n $(( 4 << 20 )) <(dd if="/dev/$dev" bs=1M count=4 iflag=direct status=none) /dev/zero \
        || fail "the first 4 MiB do not read as zeros after blkdiscard"
    if (( freed < DISCARD_MIN_FREED_MIB << 20 )); then
        local why=""
        (( wrote >= (DISCARD_MIB / 2) << 20 )) && why="; meanwhile the target itself wrote $(mib "$wrote") with write(2) calls, i.e. it wrote zeros instead of discarding (the zvol $zd takes discards, discard_max_bytes=$(cat /sys/block/$zd/queue/discard_max_bytes), but not write-zeroes, write_zeroes_max_bytes=$(cat /sys/block/$zd/queue/write_zeroes_max_bytes))"
        fail "blkdiscard of $DISCARD_MIB MiB through NVMe freed only $(mib "$freed") of $POOL/d1 (used $used0 -> $used1)$why"
    fi
}

# ---------------------------------------------------------------------------------------
# compressratio after PostgreSQL's pgbench -i on XFS on the namespace of an lz4 zvol (the way
# scenarios/nvme-tcp.sh runs PostgreSQL: directly, as the postgres user, Unix socket on tmpfs).

PG_BIN=/usr/lib/postgresql/15/bin
PG_DATA=$MNT/pgdata
PG_SOCK=$STATE/pgsock
PG_LOG=$STATE/postgres.log
PG_TIMEOUT=900

pg_run() { local t=$1 p=$2; shift 2; x timeout -k 5 "$t" runuser -u postgres -- "$PG_BIN/$p" "$@"; }
pg_sql() { timeout -k 5 120 runuser -u postgres -- "$PG_BIN/psql" -h "$PG_SOCK" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
pg_fail() {
    echo "===== $PG_LOG ====="; cat "$PG_LOG" 2>/dev/null; echo "===== end of $PG_LOG ====="
    fail "$* [postgres log: $(tail -n 4 "$PG_LOG" 2>/dev/null | cut -c1-160 | tr '\n' '|')]"
}
pg_cleanup() {
    if [[ -f $PG_DATA/postmaster.pid ]]; then
        timeout -k 5 40 runuser -u postgres -- "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m immediate -w -t 30
    fi
    pkill -KILL -u postgres 2>/dev/null
    if mountpoint -q "$MNT"; then timeout 60 umount "$MNT" || umount -l "$MNT"; fi
    return 0
}

sc_zvol_compressratio_pgbench() {
    [[ -x $PG_BIN/postgres ]] || fail "$PG_BIN/postgres missing from the image"
    local dev t0 rc count ratio used lused
    dev=$(serve pg 4423 -s -V 2G -o volblocksize=16k -o compression=lz4) || exit 1
    trap pg_cleanup EXIT
    mountpoint -q /dev/shm || x mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm || fail "cannot mount /dev/shm"
    mkdir -p "$PG_SOCK" && chown postgres:postgres "$PG_SOCK" || fail "cannot create $PG_SOCK"
    : > "$PG_LOG" && chown postgres:postgres "$PG_LOG" || fail "cannot create $PG_LOG"
    mountpoint -q "$MNT" && umount "$MNT"
    # -K: no discard of the whole namespace first. zvol-discard covers deallocate; with a target
    # that turns a deallocate of a zvol into written zeros, mkfs's 2 GiB discard takes ~10 min
    # under TCG and starves the keep-alives (the initiator resets and reconnects meanwhile).
    x mkfs.xfs -f -q -K "/dev/$dev" || fail "mkfs.xfs /dev/$dev failed"
    x mount -t xfs "/dev/$dev" "$MNT" || fail "mount /dev/$dev failed"
    rm -rf "$PG_DATA"
    mkdir -p "$PG_DATA" && chown postgres:postgres "$PG_DATA" && chmod 700 "$PG_DATA" || fail "cannot create $PG_DATA"
    pg_run "$PG_TIMEOUT" initdb -D "$PG_DATA" -U postgres -A trust -E UTF8 --no-locale --no-instructions \
        > "$STATE/initdb.out" 2>&1
    rc=$?
    cat "$STATE/initdb.out"
    [[ $rc == 0 ]] || fail "initdb failed (rc=$rc): $(tail -n 3 "$STATE/initdb.out" | tr '\n' '|')"
    {
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$PG_SOCK'"
    } >> "$PG_DATA/postgresql.conf" || fail "cannot write postgresql.conf"
    pg_run 100 pg_ctl start -D "$PG_DATA" -l "$PG_LOG" -w -t 90 || pg_fail "pg_ctl start failed"
    t0=$(now)
    pg_run "$PG_TIMEOUT" pgbench -h "$PG_SOCK" -i -s "$PG_SCALE" postgres > "$STATE/pgbench-i.out" 2>&1
    rc=$?
    cat "$STATE/pgbench-i.out"
    [[ $rc == 0 ]] || pg_fail "pgbench -i -s $PG_SCALE failed (rc=$rc): $(tail -n 2 "$STATE/pgbench-i.out" | tr '\n' '|')"
    log "pgbench -i -s $PG_SCALE took $(secs_since "$t0")s"
    count=$(pg_sql 'SELECT count(*) FROM pgbench_accounts') || pg_fail "SELECT count(*) failed"
    [[ $count == $(( PG_SCALE * 100000 )) ]] || pg_fail "pgbench_accounts has $count rows, expected $(( PG_SCALE * 100000 ))"
    log "database size $(pg_sql "SELECT pg_size_pretty(pg_database_size('postgres'))"), $PG_DATA $(du -sh "$PG_DATA" | cut -f1)"
    pg_run 130 pg_ctl stop -D "$PG_DATA" -m fast -w -t 120 || pg_fail "pg_ctl stop failed"
    x umount "$MNT" || fail "umount failed"
    disconnect_vol pg
    pool_sync
    ratio=$(zfs_num compressratio "$POOL/pg")
    used=$(zfs_num used "$POOL/pg")
    lused=$(zfs_num logicalused "$POOL/pg")
    x zfs get -H compressratio,used,logicalused,referenced,volblocksize,compression "$POOL/pg"
    info "compressratio=${ratio}x used=$used ($(mib "$used")) logicalused=$lused ($(mib "$lused")) after pgbench -i -s $PG_SCALE on XFS (lz4, volblocksize 16k)"
    awk -v r="$ratio" -v m="$PG_MIN_RATIO" 'BEGIN {exit !(r + 0 >= m + 0)}' \
        || fail "compressratio of $POOL/pg is ${ratio}x, expected at least ${PG_MIN_RATIO}x"
}

# ---------------------------------------------------------------------------------------
# grow the zvol with
# `zfs set volsize` while the host is connected; the host must see the new size.

sc_zvol_resize() {
    local dev size0 big=$(( 1 << 30 )) reply how
    dev=$(serve r1 4424 -s -V 512M -o volblocksize=16k -o compression=lz4) || exit 1
    size0=$(blockdev --getsize64 "/dev/$dev")
    (( size0 == 512 << 20 )) || fail "/dev/$dev is $size0 bytes before the resize, expected $(( 512 << 20 ))"
    dmesg | wc -l > "$STATE/dmesg.mark"
    x zfs set volsize=1G "$POOL/r1" || fail "zfs set volsize=1G $POOL/r1 failed"
    local i
    for i in $(seq 1 $(( RESIZE_WAIT_S * 5 ))); do
        [[ $(blockdev --getsize64 "/dev/zvol/$POOL/r1") == "$big" ]] && break
        sleep 0.2
    done
    [[ $(blockdev --getsize64 "/dev/zvol/$POOL/r1") == "$big" ]] || fail "the zvol device itself did not grow to 1 GiB"
    # 1. Without anyone telling the target.
    how=""
    for i in $(seq 1 $(( RESIZE_WAIT_S * 5 ))); do
        [[ $(blockdev --getsize64 "/dev/$dev") == "$big" ]] && { how="by itself"; break; }
        sleep 0.2
    done
    # 2. What a management plane would do after `zfs set volsize`: tell the target.
    if [[ -z $how ]]; then
        log "/dev/$dev still $(blockdev --getsize64 "/dev/$dev") bytes ${RESIZE_WAIT_S}s after zfs set volsize; asking the target: resize $big"
        reply=$(control r1 resize "$big")
        log "target reply: $reply"
        [[ $reply == "control: ok"* ]] && for i in $(seq 1 $(( RESIZE_WAIT_S * 5 ))); do
            [[ $(blockdev --getsize64 "/dev/$dev") == "$big" ]] && { how="after the control command"; break; }
            sleep 0.2
        done
    fi
    [[ -n $how ]] || fail "the NVMe namespace (/dev/$dev) still has $(blockdev --getsize64 "/dev/$dev") bytes after 'zfs set volsize=1G' (the zvol is $big): the target did not pick up the new size by itself within ${RESIZE_WAIT_S}s, and its control command 'resize $big' answered: ${reply:-nothing}$([[ $reply == "control: ok"* ]] && echo " (but the host did not see the new size within ${RESIZE_WAIT_S}s)")"
    log "/dev/$dev is $big bytes ($how)"
    tail -n +"$(( $(cat "$STATE/dmesg.mark") + 1 ))" < <(dmesg) | grep -i nvme
    x dd if=/dev/urandom of="$STATE/pat-r" bs=1M count=2 status=none
    x dd if="$STATE/pat-r" of="/dev/$dev" bs=1M seek=1022 oflag=direct conv=fsync status=none || fail "writing beyond the old end failed"
    [[ $(dev_sum "/dev/$dev" 1022 2) == $(sha256sum < "$STATE/pat-r" | cut -d' ' -f1) ]] || fail "data beyond the old end reads back differently"
}

# ---------------------------------------------------------------------------------------
# driver

SCENARIOS=(
    zfs-pool:sc_zfs_pool
    zvol-create:sc_zvol_create
    zvol-connect:sc_zvol_connect
    zvol-fio-verify:sc_zvol_fio_verify
    zvol-snapshot-clone:sc_zvol_snapshot_clone
    control-zvol-discard:sc_control_zvol_discard
    zvol-discard:sc_zvol_discard
    zvol-compressratio-pgbench:sc_zvol_compressratio_pgbench
    zvol-resize:sc_zvol_resize
)
# Selected only by name (E2E_ONLY / run.sh --only).
OPTIONAL_SCENARIOS=()

selected=()
if [[ -z ${E2E_ONLY:-} ]]; then
    selected=("${SCENARIOS[@]}")
else
    for s in "${SCENARIOS[@]}" "${OPTIONAL_SCENARIOS[@]}"; do
        [[ " $E2E_ONLY " == *" ${s%%:*} "* ]] && selected+=("$s")
    done
fi
echo "PLAN ${selected[*]%%:*}" > "$RESULTS"
log "plan: ${selected[*]%%:*} (targets: $TARGET_BIN --driver $DRIVER, in the guest)"

# e2e-include: lib/run.sh
run_selected

log "cleanup"
mountpoint -q "$MNT" && umount "$MNT"
[[ -e /dev/nvme-fabrics ]] && timeout 60 nvme disconnect-all
for f in "$STATE"/target-*.pid; do
    [[ -e $f ]] || continue
    kill "$(cat "$f")" 2>/dev/null
done
sleep 0.5
for f in "$STATE"/target-*.log; do
    [[ -e $f ]] || continue
    echo "===== $f ====="
    cat "$f"
done
if [[ -e /dev/zfs ]]; then
    echo "===== zpool status / zfs list ====="
    zpool status "$POOL"
    zfs list -t all -o name,used,logicalused,referenced,compressratio,volsize -r "$POOL"
fi
echo "===== guest dmesg | grep -iE 'nvme|zfs|spl|zd[0-9]' ====="
dmesg | grep -iE 'nvme|zfs|spl|zd[0-9]'
echo "===== end of guest dmesg ====="
exit "$failed"
