#!/bin/bash
# e2e-needs: scratch-disk=4G guest-bin=xatastor-target,xatastor-csi guest-cmdline@6.1=hardened_usercopy=off
#
# The CSI driver end to end, run INSIDE the guest by /sbin/xe2e-init (tests/e2e/run.sh --suite csi):
# a storage node (`xatastor-target serve --backend zvol:POOL/xs`, its admin API on gRPC with a
# bearer token), the CSI controller plugin over it (`xatastor-csi controller`) and the node plugin
# (`xatastor-csi node`, node id = the guest's /etc/nvme/hostnqn), each on its Unix socket. Every
# volume operation is a CSI call (`xatastor-csi call`, as a CO's sidecars and kubelet make them); the
# node plugin runs the guest's real nvme-cli, mkfs.xfs, mount and xfs_growfs against the kernel's
# NVMe/TCP initiator. hardened_usercopy=off on 6.1: see scenarios/node.sh.
#
# Scenarios (each sets up what it needs, so --only works):
#   csi-setup             pool, node with --admin-listen, both plugins; Probe; NodeGetInfo = host NQN
#   csi-lifecycle         CreateVolume → ControllerPublish → NodeStage (connect, mkfs, mount) →
#                         NodePublish → write → NodeUnpublish → NodeUnstage (disconnect) → stage and
#                         publish again: the data is there (no second mkfs); NodeGetVolumeStats
#   csi-expand            ControllerExpandVolume + NodeExpandVolume while mounted: the file system grows
#   csi-block             a raw block volume: the device itself at the target path, a pattern round trip
#   csi-unpublish-detach  ControllerUnpublish of a staged, mounted volume (deny-host with disconnect):
#                         the host's block device is gone within 5 s, I/O fails instead of hanging, the
#                         host's reconnect finds an empty controller; NodeUnpublish/NodeUnstage clean up
#   csi-force-delete      `volume delete --force` (admin CLI) of a staged, mounted volume: the same
#   csi-postgres-branch   PostgreSQL on a CSI volume; CreateSnapshot while it runs → CreateVolume from
#                         the snapshot → stage/publish → a second PostgreSQL starts on it with the
#                         same data; then everything deleted through CSI
#
# Output: PLAN/PASS/FAIL/TIME/INFO lines on /dev/ttyS1 as the other suites.
set -uo pipefail

RESULTS=/dev/ttyS1
STATE=/run/e2e
mkdir -p "$STATE"

POOL=xe2e
DS=$POOL/xs
DATA=$STATE/node
PORT=4420
ADMIN=127.0.0.1:4430
TOKEN=$STATE/admin.token
SERVER_LOG=$STATE/server.log
CTL_SOCK=$STATE/csi-controller.sock
NODE_SOCK=$STATE/csi-node.sock
CSI_LOG=$STATE/csi.log
KUBELET=$STATE/kubelet  # where staging and target paths live, as kubelet's would
XT=xatastor-target
ARC_MAX=$(( 256 << 20 ))
DETACH_LIMIT_S=5
PG_SCALE=5
GIB=$(( 1 << 30 ))
# StorageClass parameters of every volume: a lost controller is given up quickly.
SC_PARAMS=(--param ctrlLossTmo=30 --param reconnectDelay=2)

# e2e-include: lib/common.sh
one_line() { tr '\n' ' ' | sed 's/\x1b\[[0-9;]*m//g; s/  */ /g' | cut -c1-300; }

mkdir -p /etc/nvme
[[ -s /etc/nvme/hostnqn ]] || nvme gen-hostnqn > /etc/nvme/hostnqn
if [[ ! -s /etc/nvme/hostid ]]; then
    id=$(sed -n 's/.*:uuid:\([0-9a-fA-F-]\{36\}\)$/\1/p' /etc/nvme/hostnqn)
    echo "${id:-$(cat /proc/sys/kernel/random/uuid)}" > /etc/nvme/hostid
fi
HOSTNQN=$(cat /etc/nvme/hostnqn)

# e2e-include: lib/zfs.sh
# e2e-include: lib/nvme.sh

pool_setup() {
    pool_create
    zfs list -H "$DS" > /dev/null 2>&1 || x zfs create "$DS" || fail "zfs create $DS failed"
}

# json_get KEY [SUBKEY]: a field of the JSON object on stdin.
json_get() {
    python3 -c '
import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1:]:
    v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else v))' "$@"
}

# ---------------------------------------------------------------------------------------
# the processes

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# bg NAME LOG CMD...: CMD in the background, its pid in STATE/NAME.pid.
bg() {
    local name=$1 logf=$2
    shift 2
    echo "===== [$(now)s] start: $* =====" >> "$logf"
    log "+ $* &"
    ( NO_COLOR=1 "$@" & echo $! > "$STATE/$name.pid"; wait $!; echo $? > "$STATE/$name.rc" ) >> "$logf" 2>&1 < /dev/null &
}

wait_for() {
    local what=$1 i
    shift
    for i in $(seq 1 300); do "$@" && return 0; sleep 0.2; done
    fail "$what did not happen within 60s"
}

server_start() {
    pid_alive "$STATE/server.pid" && return 0
    pool_setup
    command -v "$XT" > /dev/null || fail "$XT not in PATH (run through run.sh: guest-bin)"
    mkdir -p "$DATA"
    if [[ ! -s $TOKEN ]]; then
        head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$TOKEN"
    fi
    chmod 600 "$TOKEN"
    touch "$SERVER_LOG"
    bg server "$SERVER_LOG" "$XT" --data-dir "$DATA" serve --backend "zvol:$DS" --listen "127.0.0.1:$PORT" \
        --metrics-listen off --admin-listen "$ADMIN" --admin-token-file "$TOKEN" --log info
    wait_for "the node's admin socket" test -S "$DATA/admin.sock"
    wait_for "the node's gRPC admin API" grep -q 'admin gRPC' "$SERVER_LOG"
}

plugins_start() {
    server_start
    need_nvme_tcp
    mkdir -p "$KUBELET"
    if ! pid_alive "$STATE/controller.pid"; then
        rm -f "$CTL_SOCK"
        bg controller "$CSI_LOG" xatastor-csi controller --endpoint "unix://$CTL_SOCK" \
            --storage-node "n1=http://$ADMIN" --admin-token-file "$TOKEN"
        wait_for "the controller plugin's socket" test -S "$CTL_SOCK"
    fi
    if ! pid_alive "$STATE/node.pid"; then
        rm -f "$NODE_SOCK"
        bg node "$CSI_LOG" xatastor-csi node --endpoint "unix://$NODE_SOCK" --state-dir "$STATE/csi-state"
        wait_for "the node plugin's socket" test -S "$NODE_SOCK"
    fi
}

# ctl / nod RPC ARGS...: one CSI call to the controller / node plugin; the JSON answer on stdout.
ctl() { echo "+ xatastor-csi call controller $*" >&2; timeout -k 5 180 xatastor-csi call --endpoint "$CTL_SOCK" "$@"; }
nod() { echo "+ xatastor-csi call node $*" >&2; timeout -k 5 180 xatastor-csi call --endpoint "$NODE_SOCK" "$@"; }

# The volume of the last `provision`: VID, its node-side NQN, the contexts NodeStage gets.
# provision NAME SIZE [create-volume options...]: CreateVolume + ControllerPublish.
provision() {
    local name=$1 size=$2 out pub
    shift 2
    out=$(ctl create-volume "$name" --size "$size" "${SC_PARAMS[@]}" "$@") || fail "CreateVolume $name failed: $out"
    VID=$(json_get volume_id <<< "$out")
    [[ $VID == n1/* ]] || fail "CreateVolume $name: volume id '$VID' does not name the storage node"
    local block=()
    [[ " $* " == *" --block "* ]] && block=(--block)
    pub=$(ctl publish "$VID" "$HOSTNQN" "${block[@]}") || fail "ControllerPublish $VID failed"
    NQN=$(json_get publish_context nqn <<< "$pub")
    CTX=()
    local k
    for k in address port nqn; do CTX+=(--context "$k=$(json_get publish_context "$k" <<< "$pub")"); done
    for k in nrIoQueues keepAliveTmo ctrlLossTmo reconnectDelay; do
        CTX+=(--context "$k=$(json_get volume_context "$k" <<< "$out")")
    done
    log "provisioned $VID ($NQN), publish context: ${CTX[*]}"
}

# stage_publish NAME [--block]: NodeStage + NodePublish of VID at KUBELET/NAME-{stage,target}.
stage_publish() {
    local name=$1
    shift
    STAGE=$KUBELET/$name-stage TARGET=$KUBELET/$name-target
    mkdir -p "$STAGE"
    nod stage "$VID" "$STAGE" "${CTX[@]}" "$@" > /dev/null || fail "NodeStageVolume $VID failed"
    nod node-publish "$VID" "$STAGE" "$TARGET" "${CTX[@]}" "$@" > /dev/null || fail "NodePublishVolume $VID failed"
}

unpublish_unstage() {
    nod node-unpublish "$VID" "$TARGET" > /dev/null || fail "NodeUnpublishVolume $VID failed"
    nod unstage "$VID" "$STAGE" > /dev/null || fail "NodeUnstageVolume $VID failed"
}

file_sum() { sha256sum < "$1" | cut -d' ' -f1; }

# detach_check WHAT DEV T0: DEV disappears within DETACH_LIMIT_S of uptime T0; I/O on the mounted
# file system fails promptly instead of hanging; the host's reconnect stops (an empty controller).
detach_check() {
    local what=$1 dev=$2 t0=$3 gone="" i state
    for i in $(seq 1 $(( DETACH_LIMIT_S * 20 + 20 ))); do
        [[ -b /dev/$dev ]] || { gone=$(secs_since "$t0"); break; }
        sleep 0.05
    done
    dmesg | tail -n 20 | grep -iE 'nvme|xfs'
    [[ -n $gone ]] || fail "/dev/$dev still exists $(secs_since "$t0")s after $what"
    awk -v g="$gone" -v l="$DETACH_LIMIT_S" 'BEGIN {exit !(g <= l)}' \
        || fail "/dev/$dev went away only ${gone}s after $what (limit ${DETACH_LIMIT_S}s)"
    local t1 rc
    t1=$(now)
    timeout 30 dd if=/dev/zero of="$TARGET/after-detach" bs=4k count=1 oflag=direct,sync status=none 2> "$STATE/io.err"
    rc=$?
    [[ $rc != 0 ]] || fail "a write to the detached volume's file system succeeded"
    [[ $rc != 124 ]] || fail "a write to the detached volume's file system hung (30 s timeout)"
    local io_s
    io_s=$(secs_since "$t1")
    # The host reconnects (reconnectDelay 2 s) and finds a controller without namespaces: it stops
    # retrying (instead of failing every attempt until its ctrlLossTmo, 30 s here).
    local until=$(( ${t0%.*} + 15 ))
    while :; do
        state=$(cat "/sys/class/nvme/$(ctrls_of "$NQN" | head -n1)/state" 2>/dev/null)
        [[ $state == live ]] && break
        (( $(now | cut -d. -f1) > until )) && break
        sleep 0.2
    done
    log "after $what: controller(s) [$(ctrls_of "$NQN" | tr '\n' ' ')] state '$state'"
    [[ $state == live ]] || fail "the host's controller is '${state:-gone}' 15 s after $what: it should have reconnected to an empty controller"
    [[ -z $(ns_dev_of "$NQN") ]] || fail "a namespace of $NQN came back after $what"
    info "$what: device-gone-after=${gone}s io-error-after=${io_s}s ($(one_line < "$STATE/io.err")) controller=${state:-gone}"
}

# ---------------------------------------------------------------------------------------
# scenarios

sc_csi_setup() {
    plugins_start
    local p info
    p=$(ctl probe) || fail "controller Probe failed"
    [[ $(json_get name <<< "$p") == csi.xatastor.io && $(json_get ready <<< "$p") == True ]] || fail "controller Probe: $p"
    p=$(nod probe) || fail "node Probe failed"
    info=$(nod node-info) || fail "NodeGetInfo failed"
    [[ $(json_get node_id <<< "$info") == "$HOSTNQN" ]] || fail "NodeGetInfo: node id '$(json_get node_id <<< "$info")', not the host NQN $HOSTNQN"
    # The admin API refuses callers without the token.
    local bad=$STATE/bad.token
    echo "wrong-token-000000000000" > "$bad" && chmod 600 "$bad"
    timeout 30 xatastor-csi controller --endpoint "unix://$STATE/bad.sock" --storage-node "n1=http://$ADMIN" \
        --admin-token-file "$bad" > "$STATE/bad.log" 2>&1 &
    local bp=$!
    wait_for "the wrong-token controller's socket" test -S "$STATE/bad.sock"
    local out
    out=$(timeout 60 xatastor-csi call --endpoint "$STATE/bad.sock" create-volume refused --size "$GIB" 2>&1) && fail "CreateVolume with a wrong admin token succeeded"
    kill "$bp" 2>/dev/null
    grep -qi 'credentials\|unauthenticated\|token' <<< "$out" || fail "a wrong admin token failed without saying so: $out"
    xt_vol=$(timeout 30 "$XT" --data-dir "$DATA" volume list 2>&1)
    grep -q refused <<< "$xt_vol" && fail "the refused call created a volume"
    info "node_id=$HOSTNQN plugin=$(json_get vendor_version <<< "$p")"
}

sc_csi_lifecycle() {
    plugins_start
    provision pvc-life "$GIB"
    stage_publish life
    local dev sum stats total
    dev=$(ns_dev_of "$NQN") || fail "no block device for $NQN after NodeStageVolume"
    mountpoint -q "$STAGE" || fail "$STAGE is not mounted after NodeStageVolume"
    mountpoint -q "$TARGET" || fail "$TARGET is not mounted after NodePublishVolume"
    [[ $(findmnt -n -o FSTYPE "$STAGE") == xfs ]] || fail "the staged file system is $(findmnt -n -o FSTYPE "$STAGE"), not xfs"
    log "/dev/$dev staged at $STAGE, published at $TARGET"
    # Idempotent retries.
    nod stage "$VID" "$STAGE" "${CTX[@]}" > /dev/null || fail "a repeated NodeStageVolume failed"
    nod node-publish "$VID" "$STAGE" "$TARGET" "${CTX[@]}" > /dev/null || fail "a repeated NodePublishVolume failed"
    x dd if=/dev/urandom of="$TARGET/data" bs=1M count=8 status=none conv=fsync || fail "writing to the published volume failed"
    sum=$(file_sum "$TARGET/data")
    stats=$(nod stats "$VID" "$TARGET") || fail "NodeGetVolumeStats failed"
    total=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["usage"][0]["total"])' <<< "$stats")
    (( total > 900 << 20 )) || fail "NodeGetVolumeStats: total $total bytes"
    unpublish_unstage
    mountpoint -q "$TARGET" && fail "$TARGET still mounted after NodeUnpublishVolume"
    mountpoint -q "$STAGE" && fail "$STAGE still mounted after NodeUnstageVolume"
    [[ -z $(ctrls_of "$NQN") ]] || fail "controller $(ctrls_of "$NQN") of $NQN still there after NodeUnstageVolume"
    nod unstage "$VID" "$STAGE" > /dev/null || fail "a repeated NodeUnstageVolume failed"
    # Again: the file system is found (not made anew) and holds the data.
    stage_publish life
    [[ -f $TARGET/data && $(file_sum "$TARGET/data") == "$sum" ]] || fail "the data written before unstaging is not there after staging again"
    info "volume=$VID stats_total=$total"
    unpublish_unstage
    ctl unpublish "$VID" "$HOSTNQN" > /dev/null || fail "ControllerUnpublish failed"
    ctl delete-volume "$VID" > /dev/null || fail "DeleteVolume failed"
    zfs list -H "$DS/pvc-life" > /dev/null 2>&1 && fail "DeleteVolume left $DS/pvc-life"
    return 0
}

sc_csi_expand() {
    plugins_start
    provision pvc-grow "$GIB"
    stage_publish grow
    local size0 size1 r sum t0
    x dd if=/dev/urandom of="$TARGET/data" bs=1M count=4 status=none conv=fsync || fail "write failed"
    sum=$(file_sum "$TARGET/data")
    size0=$(df -B1 --output=size "$TARGET" | tail -n1)
    t0=$(now)
    r=$(ctl expand "$VID" $(( 2 * GIB ))) || fail "ControllerExpandVolume failed"
    [[ $(json_get capacity_bytes <<< "$r") == $(( 2 * GIB )) && $(json_get node_expansion_required <<< "$r") == True ]] \
        || fail "ControllerExpandVolume: $r"
    nod node-expand "$VID" "$TARGET" $(( 2 * GIB )) > /dev/null || fail "NodeExpandVolume failed"
    size1=$(df -B1 --output=size "$TARGET" | tail -n1)
    log "file system size $size0 -> $size1"
    (( size1 > size0 + (900 << 20) )) || fail "the file system did not grow online ($size0 -> $size1 bytes)"
    [[ $(file_sum "$TARGET/data") == "$sum" ]] || fail "the data changed while growing"
    info "fs-size=$size0->$size1 grown-after=$(secs_since "$t0")s (online, mounted)"
    unpublish_unstage
    ctl unpublish "$VID" "$HOSTNQN" > /dev/null
    ctl delete-volume "$VID" > /dev/null || fail "DeleteVolume failed"
}

sc_csi_block() {
    plugins_start
    provision pvc-raw $(( 256 << 20 )) --block
    stage_publish raw --block
    [[ -b $TARGET ]] || fail "$TARGET is not a block device after NodePublishVolume (block)"
    [[ $(blockdev --getsize64 "$TARGET") == $(( 256 << 20 )) ]] || fail "$TARGET has $(blockdev --getsize64 "$TARGET") bytes"
    dd if=/dev/urandom of="$STATE/raw.pat" bs=1M count=4 status=none
    x dd if="$STATE/raw.pat" of="$TARGET" bs=1M seek=16 oflag=direct conv=fsync status=none || fail "writing the raw volume failed"
    [[ $(dd if="$TARGET" bs=1M skip=16 count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1) == $(file_sum "$STATE/raw.pat") ]] \
        || fail "the raw volume reads back differently"
    # Stats of a raw block volume: the device's size (the device is found by its number, not by
    # the bind mount's source), the condition normal.
    local stats total abnormal
    stats=$(nod stats "$VID" "$TARGET") || fail "NodeGetVolumeStats (block) failed"
    total=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["usage"][0]["total"])' <<< "$stats")
    [[ $total == $(( 256 << 20 )) ]] || fail "NodeGetVolumeStats (block): total $total bytes: $stats"
    abnormal=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["abnormal"])' <<< "$stats")
    [[ $abnormal == False ]] || fail "NodeGetVolumeStats (block): abnormal: $stats"
    unpublish_unstage
    [[ -e $TARGET ]] && fail "NodeUnpublishVolume left $TARGET"
    ctl unpublish "$VID" "$HOSTNQN" > /dev/null
    ctl delete-volume "$VID" > /dev/null || fail "DeleteVolume failed"
}

sc_csi_unpublish_detach() {
    plugins_start
    provision pvc-detach "$GIB"
    stage_publish detach
    local dev t0
    dev=$(ns_dev_of "$NQN") || fail "no block device"
    x dd if=/dev/urandom of="$TARGET/data" bs=1M count=4 status=none conv=fsync || fail "write failed"
    t0=$(now)
    ctl unpublish "$VID" "$HOSTNQN" > /dev/null || fail "ControllerUnpublishVolume failed"
    detach_check ControllerUnpublish "$dev" "$t0"
    # The CO then cleans up on the node: unmount the dead file system, disconnect.
    unpublish_unstage
    [[ -z $(ctrls_of "$NQN") ]] || fail "controller of $NQN still there after NodeUnstageVolume"
    ctl delete-volume "$VID" > /dev/null || fail "DeleteVolume failed"
}

sc_csi_force_delete() {
    plugins_start
    provision pvc-gone "$GIB"
    stage_publish gone
    local dev t0 name=${VID#n1/}
    dev=$(ns_dev_of "$NQN") || fail "no block device"
    x dd if=/dev/urandom of="$TARGET/data" bs=1M count=4 status=none conv=fsync || fail "write failed"
    t0=$(now)
    x timeout 60 "$XT" --data-dir "$DATA" volume delete "$name" --force || fail "volume delete $name --force failed"
    detach_check "volume delete --force" "$dev" "$t0"
    zfs list -H "$DS/$name" > /dev/null 2>&1 && fail "$DS/$name still exists"
    unpublish_unstage
    [[ -z $(ctrls_of "$NQN") ]] || fail "controller of $NQN still there after NodeUnstageVolume"
    ctl delete-volume "$VID" > /dev/null || fail "DeleteVolume of a deleted volume failed"
}

# ---- PostgreSQL, branched through CSI calls only ----

PG_BIN=/usr/lib/postgresql/15/bin
pg_sock() { echo "$STATE/pgsock-$1"; }
pg_run() { local t=$1 p=$2; shift 2; x timeout -k 5 "$t" runuser -u postgres -- "$PG_BIN/$p" "$@"; }
pg_sql() { timeout -k 5 120 runuser -u postgres -- "$PG_BIN/psql" -h "$(pg_sock "$1")" -p "$2" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$3"; }
pg_state() { pg_sql "$1" "$2" "SELECT count(*) || ' ' || sum(abalance) || ' ' || md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts"; }
pg_start() {
    local i=$1 port=$2 dir=$3
    mkdir -p "$(pg_sock "$i")" && chown postgres:postgres "$(pg_sock "$i")"
    touch "$STATE/pg-$i.log" && chown postgres:postgres "$STATE/pg-$i.log"
    pg_run 200 pg_ctl start -D "$dir" -l "$STATE/pg-$i.log" -w -t 180 -o "-p $port -k $(pg_sock "$i")" \
        || fail "pg_ctl start ($i) failed: $(tail -n 3 "$STATE/pg-$i.log" | one_line)"
}
pg_cleanup() {
    local d
    for d in "$KUBELET"/pg-*-target/pgdata; do
        [[ -f $d/postmaster.pid ]] && timeout -k 5 40 runuser -u postgres -- "$PG_BIN/pg_ctl" stop -D "$d" -m immediate -w -t 30
    done
    pkill -KILL -u postgres 2>/dev/null
    return 0
}

sc_csi_postgres_branch() {
    [[ -x $PG_BIN/postgres ]] || fail "$PG_BIN/postgres missing from the image"
    plugins_start
    trap pg_cleanup EXIT
    mountpoint -q /dev/shm || x mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm
    provision pvc-pg "$GIB" --param compression=lz4
    local main_vid=$VID main_ctx=("${CTX[@]}") main_stage main_target
    stage_publish pg-main
    main_stage=$STAGE main_target=$TARGET
    local pgdata=$main_target/pgdata rc state0 state_b state_m2 state_b2 sid out
    mkdir -p "$pgdata" && chown postgres:postgres "$pgdata" && chmod 700 "$pgdata"
    pg_run 900 initdb -D "$pgdata" -U postgres -A trust -E UTF8 --no-locale --no-instructions > "$STATE/initdb.out" 2>&1
    rc=$?
    [[ $rc == 0 ]] || fail "initdb failed: $(tail -n 3 "$STATE/initdb.out" | one_line)"
    echo "listen_addresses = ''" >> "$pgdata/postgresql.conf"
    pg_start main 5432 "$pgdata"
    pg_run 900 pgbench -h "$(pg_sock main)" -p 5432 -i -s "$PG_SCALE" postgres > "$STATE/pgbench.out" 2>&1 || fail "pgbench -i failed"
    pg_run 300 pgbench -h "$(pg_sock main)" -p 5432 -c 2 -j 2 -T 5 postgres >> "$STATE/pgbench.out" 2>&1 || fail "pgbench -T 5 failed"
    pg_sql main 5432 CHECKPOINT || fail "CHECKPOINT failed"
    state0=$(pg_state main 5432) || fail "reading main's state failed"
    # The branch, through CSI only: a snapshot while PostgreSQL runs, a volume from it.
    out=$(ctl create-snapshot "$main_vid" branch-snap) || fail "CreateSnapshot failed"
    sid=$(json_get snapshot_id <<< "$out")
    [[ $(json_get ready_to_use <<< "$out") == True && $sid == "$main_vid@"* ]] || fail "CreateSnapshot: $out"
    provision pvc-pg-branch "$GIB" --from-snapshot "$sid"
    local branch_vid=$VID
    stage_publish pg-branch
    [[ -f $TARGET/pgdata/PG_VERSION ]] || fail "the branch has no PostgreSQL data directory"
    # The clone carries the running main's postmaster.pid: stale for the branch.
    rm -f "$TARGET/pgdata/postmaster.pid"
    pg_start branch 5433 "$TARGET/pgdata"
    state_b=$(pg_state branch 5433) || fail "reading the branch's state failed"
    log "main: $state0; branch: $state_b"
    [[ $state_b == "$state0" ]] || fail "the branch ($state_b) differs from main at the snapshot ($state0)"
    pg_sql branch 5433 "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 100; CHECKPOINT" || fail "UPDATE on the branch failed"
    state_b2=$(pg_state branch 5433)
    state_m2=$(pg_state main 5432)
    [[ $state_b2 != "$state0" && $state_m2 == "$state0" ]] || fail "a write on the branch is seen on main or not on the branch"
    pg_run 130 pg_ctl stop -D "$TARGET/pgdata" -m fast -w -t 120 || fail "stopping the branch failed"
    pg_run 130 pg_ctl stop -D "$pgdata" -m fast -w -t 120 || fail "stopping main failed"
    info "pgbench-accounts=$(cut -d' ' -f1 <<< "$state0") branch-equal-at-snapshot=yes snapshot=$sid"
    # Everything away through CSI: the branch, the snapshot, main.
    unpublish_unstage
    ctl unpublish "$branch_vid" "$HOSTNQN" > /dev/null
    ctl delete-volume "$branch_vid" > /dev/null || fail "DeleteVolume of the branch failed"
    ctl delete-snapshot "$sid" > /dev/null || fail "DeleteSnapshot failed"
    VID=$main_vid STAGE=$main_stage TARGET=$main_target
    unpublish_unstage
    ctl unpublish "$main_vid" "$HOSTNQN" > /dev/null
    ctl delete-volume "$main_vid" > /dev/null || fail "DeleteVolume of main failed"
    [[ -z $(zfs list -H -o name -t all -r "$DS" | grep -E 'pvc-pg') ]] || fail "volumes or snapshots left: $(zfs list -H -o name -t all -r "$DS" | one_line)"
    : "${main_ctx[@]}"
}

# ---------------------------------------------------------------------------------------
# driver

SCENARIOS=(
    csi-setup:sc_csi_setup
    csi-lifecycle:sc_csi_lifecycle
    csi-expand:sc_csi_expand
    csi-block:sc_csi_block
    csi-unpublish-detach:sc_csi_unpublish_detach
    csi-force-delete:sc_csi_force_delete
    csi-postgres-branch:sc_csi_postgres_branch
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
log "plan: ${selected[*]%%:*} (host NQN $HOSTNQN)"

# e2e-include: lib/run.sh
run_selected

log "cleanup"
for m in $(findmnt -rn -o TARGET | grep "^$KUBELET/" | sort -r); do umount "$m" 2>/dev/null || umount -l "$m"; done
[[ -e /dev/nvme-fabrics ]] && timeout 60 nvme disconnect-all
for p in node controller server; do
    pid_alive "$STATE/$p.pid" && kill -TERM "$(cat "$STATE/$p.pid")"
done
sleep 2
echo "===== $SERVER_LOG ====="; sed 's/\x1b\[[0-9;]*m//g' "$SERVER_LOG" 2>/dev/null
echo "===== $CSI_LOG ====="; sed 's/\x1b\[[0-9;]*m//g' "$CSI_LOG" 2>/dev/null
echo "===== guest dmesg | grep -iE 'nvme|xfs' ====="
dmesg | grep -iE 'nvme|xfs'
exit "$failed"
