#!/bin/bash
# NVMe/TCP end-to-end scenarios, run INSIDE the guest by /sbin/xe2e-init.
# e2e-needs: auth-target guest-cmdline=log_buf_len=8M
#
# Input (environment, from the fw_cfg env file written by run.sh):
#   E2E_ADDR E2E_PORT   where the target listens, as seen from the guest (10.0.2.2:PORT)
#   E2E_NQN             subsystem NQN served by the target
#   E2E_SERIAL          serial number the target reports
#   E2E_SIZE_BYTES      namespace size; E2E_BLOCK_SIZE its logical block size
#   E2E_HOSTNQN E2E_HOSTID            the host identity the target allows
#   E2E_BAD_HOSTNQN E2E_BAD_HOSTID    a host identity the target must refuse
#   E2E_ONLY            optional space-separated list of scenario names to run
#   E2E_KATO            keep-alive timeout (s) used by keepalive-expiry
#   E2E_KERNEL          the guest kernel run.sh booted (6.1 or 6.12): the control-auth-* and
#                       auth-* scenarios (DH-HMAC-CHAP) are planned only on kernels with NVMe
#                       authentication, i.e. not on 6.1 (unless named in E2E_ONLY: then they fail)
#   E2E_AUTH_PORT E2E_AUTH_NQN E2E_AUTH_SERIAL E2E_AUTH_SIZE_BYTES
#                       the second target instance run.sh starts for the auth-* scenarios
#                       ('# e2e-needs: auth-target'), on 10.0.2.2:E2E_AUTH_PORT
#
# Output: one line per scenario on /dev/ttyS1 ("PASS <name>" / "FAIL <name>: <reason>"),
# preceded by "PLAN <names...>"; everything else (command traces, tool output, dmesg)
# goes to stdout = the serial console.
# Requests to the host: "ACTION <scenario> <command> [args...]" lines on /dev/ttyS1, which
# run.sh acts on while the guest runs (see action() and run.sh: resize, keepalive-mark,
# keepalive-check). For these the guest observes the effect (e.g. polls the namespace size),
# and run.sh adds its own verdict for the scenario (e.g. keepalive-expiry). The auth-target,
# auth-ctl and auth-log requests (action_wait) are answered: run.sh writes "REPLY TOKEN TEXT"
# to the guest's /dev/ttyS2.
#
# Scenarios keep going after a failure; each one establishes the connection state it
# needs (helpers connect/disconnect), so a failing scenario does not mask later ones.
set -uo pipefail

RESULTS=/dev/ttyS1
STATE=/run/e2e
MNT=/mnt/e2e
mkdir -p "$STATE" "$MNT"

# Bounded waits for kernel-side operations that may hang on a broken target. nvme-tcp
# reconnects for ctrl_loss_tmo seconds after an error; keep that short so a scenario
# that breaks the association fails in bounded time instead of hanging.
CONNECT_OPTS=(--ctrl-loss-tmo=20 --reconnect-delay=2)
FIO_TIMEOUT=900
# How long the guest waits for a resize to show up (the host learns it from an AEN).
RESIZE_WAIT_S=20
E2E_KATO=${E2E_KATO:-5}

# The kernel's own nvmet-tcp target inside the guest (control-* scenarios): file-backed
# namespace on tmpfs, listening on the guest's loopback.
CTL_NQN=nqn.2026-01.io.xatastor:e2e-control
CTL_SERIAL=XSE2ECTL01
CTL_ADDR=127.0.0.1
CTL_PORT=4420
CTL_SIZE_BYTES=$(( 64 << 20 ))
CTL_FILE=$STATE/control-ns.img
NVMET=/sys/kernel/config/nvmet
# DH-HMAC-CHAP against that nvmet target (control-auth-*; --kernel 6.12): a second subsystem on
# a second port, for a second host identity that must authenticate. nvmet keeps the keys per
# host, not per subsystem, so the main host identity stays unauthenticated for the others.
AUTH_NQN=nqn.2026-01.io.xatastor:e2e-control-auth
AUTH_SERIAL=XSE2EAUTH1
AUTH_PORT=4421
AUTH_PORT_ID=2
AUTH_SIZE_BYTES=$(( 16 << 20 ))
AUTH_FILE=$STATE/control-auth-ns.img
AUTH_HOSTNQN=nqn.2026-01.io.xatastor:e2e-guest-auth
AUTH_HOSTID=6a0f3e5c-2b1d-4c8e-9f70-0e2e000000a1
# What the host offers in its DH-HMAC-CHAP Negotiate (Linux: all of them); nvmet picks the
# configured one.
AUTH_HASHES=("hmac(sha256)" "hmac(sha384)" "hmac(sha512)")
AUTH_DHGROUPS=(null ffdhe2048 ffdhe3072 ffdhe4096 ffdhe6144 ffdhe8192)
ADMIN_TIMEOUT_PARAM=/sys/module/nvme_core/parameters/admin_timeout

: "${E2E_ADDR:?}" "${E2E_PORT:?}" "${E2E_NQN:?}" "${E2E_SERIAL:?}" "${E2E_SIZE_BYTES:?}"
: "${E2E_BLOCK_SIZE:?}" "${E2E_HOSTNQN:?}" "${E2E_HOSTID:?}" "${E2E_BAD_HOSTNQN:?}" "${E2E_BAD_HOSTID:?}"

# The host identity nvme-cli uses by default, so even commands without --hostnqn agree.
mkdir -p /etc/nvme
echo "$E2E_HOSTNQN" > /etc/nvme/hostnqn
echo "$E2E_HOSTID" > /etc/nvme/hostid

# e2e-include: lib/common.sh
# Ask run.sh (on the host) to do something now, on behalf of the current scenario.
action() { log "ACTION $E2E_SCENARIO $*"; echo "ACTION $E2E_SCENARIO $*" > "$RESULTS"; }
# run.sh's replies come on ttyS2; it stays open (a serial port that nobody holds open drops
# what it receives), raw and without echo.
REPLY_FD=""
if { exec {REPLY_FD}< /dev/ttyS2; } 2>/dev/null; then
    stty -F /dev/ttyS2 raw -echo 2>/dev/null || log "stty on /dev/ttyS2 failed"
else
    REPLY_FD=""
fi
REPLY_WAIT_S=60
# action_wait COMMAND [ARGS...]: ask the host for COMMAND (with a token before ARGS) and wait
# (REPLY_WAIT_S) for its answer; prints the reply text.
action_wait() {
    local cmd=$1 token line deadline
    shift
    [[ -n $REPLY_FD ]] || fail "no reply channel from run.sh (/dev/ttyS2 cannot be opened)"
    token="$E2E_SCENARIO.$(date +%s%N)"
    action "$cmd" "$token" "$@" >&2
    deadline=$(( SECONDS + REPLY_WAIT_S ))
    while (( SECONDS < deadline )); do
        IFS= read -r -t "$(( deadline - SECONDS ))" -u "$REPLY_FD" line || continue
        line=${line%$'\r'}
        if [[ $line == "REPLY $token "* ]]; then
            log "reply: ${line#"REPLY $token "}" >&2
            echo "${line#"REPLY $token "}"
            return 0
        fi
        log "ignoring a reply to another request: $line" >&2
    done
    fail "no reply from run.sh to '$cmd' within ${REPLY_WAIT_S}s"
}

# ---------------------------------------------------------------------------------------
# helpers

# e2e-include: lib/nvme.sh
# e2e-include: lib/auth.sh
ns_dev() { ns_dev_of "$E2E_NQN"; }

our_ctrls() { ctrls_of "$E2E_NQN"; }

wait_for_dev_of() {
    local i d
    for i in $(seq 1 150); do # 30 s
        if d=$(ns_dev_of "$1"); then echo "$d"; return 0; fi
        sleep 0.2
    done
    return 1
}
wait_for_dev() { wait_for_dev_of "$E2E_NQN"; }

wait_for_no_ctrl_of() {
    local i
    for i in $(seq 1 150); do
        [[ -z $(ctrls_of "$1") ]] && return 0
        sleep 0.2
    done
    return 1
}
wait_for_no_ctrl() { wait_for_no_ctrl_of "$E2E_NQN"; }

# wait_for_ctrl_state CTRL STATE SECONDS
wait_for_ctrl_state() {
    local i
    for i in $(seq 1 $(( $3 * 5 ))); do
        [[ $(cat "/sys/class/nvme/$1/state" 2>/dev/null) == "$2" ]] && return 0
        sleep 0.2
    done
    return 1
}

# wait_for_size DEV BYTES SECONDS: until blockdev --getsize64 reports BYTES.
wait_for_size() {
    local i
    for i in $(seq 1 $(( $3 * 5 ))); do
        [[ $(blockdev --getsize64 "/dev/$1" 2>/dev/null) == "$2" ]] && return 0
        sleep 0.2
    done
    return 1
}

# connect_to ADDR PORT NQN [extra nvme-connect options...]: connect with the allowed host
# identity, wait for the namespace block device; prints its name.
connect_to() {
    local addr=$1 port=$2 nqn=$3
    shift 3
    need_nvme_tcp
    x timeout 60 nvme connect -t tcp -a "$addr" -s "$port" -n "$nqn" \
        --hostnqn "$E2E_HOSTNQN" --hostid "$E2E_HOSTID" "${CONNECT_OPTS[@]}" "$@" >&2 \
        || fail "nvme connect to $nqn $* failed (rc=$?)"
    local d
    d=$(wait_for_dev_of "$nqn") || fail "namespace block device did not appear within 30s after nvme connect to $nqn $*"
    echo "$d"
}
# connect [extra nvme-connect options...]: the same, to our target.
connect() { connect_to "$E2E_ADDR" "$E2E_PORT" "$E2E_NQN" "$@"; }

disconnect_of() {
    if [[ -n $(ctrls_of "$1") ]]; then
        x timeout 60 nvme disconnect -n "$1" || fail "nvme disconnect -n $1 failed (rc=$?)"
    fi
    wait_for_no_ctrl_of "$1" || fail "controller still present 30s after nvme disconnect: $(ctrls_of "$1" | tr '\n' ' ')"
}

disconnect() {
    mountpoint -q "$MNT" && umount "$MNT"
    disconnect_of "$E2E_NQN"
}

# Connected with default options (reusing an existing connection).
ensure_connected() {
    local d
    if d=$(ns_dev); then echo "$d"; else connect; fi
}

dmesg_mark() { dmesg | wc -l > "$STATE/dmesg.mark"; }
dmesg_since_mark() { dmesg | tail -n +"$(( $(cat "$STATE/dmesg.mark") + 1 ))"; }
# The same without the keep-alive that a host aborts while it removes a controller on purpose
# (nvme disconnect): a keep-alive in flight at that moment ends with an error, which 6.12 logs as
# "long keepalive RTT" and "failed nvme_keep_alive_end_io". Only lines of a controller between its
# "Removing ctrl" and its next "new ctrl" are dropped.
dmesg_since_mark_but_teardown() {
    dmesg_since_mark | awk '
        function ctrl(line) { sub(/.*nvme nvme/, "", line); sub(/:.*/, "", line); return line }
        /nvme nvme[0-9]+: Removing ctrl/ { removing[ctrl($0)] = 1; print; next }
        /nvme nvme[0-9]+: new ctrl/ { delete removing[ctrl($0)]; print; next }
        /nvme nvme[0-9]+: (failed nvme_keep_alive_end_io|long keepalive RTT)/ { if (ctrl($0) in removing) next }
        { print }'
}

# fio verify run: fio_verify DEV BS SIZE
fio_verify() {
    local dev=$1 bs=$2 size=$3
    x timeout "$FIO_TIMEOUT" fio --name=v --filename="/dev/$dev" --direct=1 --rw=randwrite \
        --bs="$bs" --size="$size" --ioengine=libaio --iodepth=8 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 > "$STATE/fio.out" 2>&1
    local rc=$?
    cat "$STATE/fio.out"
    [[ $rc == 0 ]] || fail "fio bs=$bs size=$size randwrite+verify failed (rc=$rc): $(grep -m1 -iE 'verify|bad|error|err=' "$STATE/fio.out" | cut -c1-200)"
    grep -q 'err= 0' "$STATE/fio.out" || fail "fio bs=$bs size=$size: no 'err= 0' in fio's report"
}

# ---------------------------------------------------------------------------------------
# scenarios

sc_discover() {
    x modprobe nvme-tcp || fail "modprobe nvme-tcp failed"
    [[ -e /dev/nvme-fabrics ]] || fail "/dev/nvme-fabrics missing after modprobe nvme-tcp"
    discover_check "$E2E_ADDR" "$E2E_PORT" "$E2E_NQN"
}

# discover_check ADDR PORT NQN: nvme discover succeeds and lists exactly one NVM subsystem, NQN.
discover_check() {
    local addr=$1 port=$2 nqn=$3
    x timeout 60 nvme discover -t tcp -a "$addr" -s "$port" \
        --hostnqn "$E2E_HOSTNQN" --hostid "$E2E_HOSTID" > "$STATE/discover.out" 2>&1
    local rc=$?
    cat "$STATE/discover.out"
    [[ $rc == 0 ]] || fail "nvme discover failed (rc=$rc): $(tail -n1 "$STATE/discover.out")"
    # Pair each entry's subtype with its subnqn; NVM subsystem entries must be exactly ours.
    local entries nvm_nqns
    entries=$(awk '/^subtype:/ {sub(/^subtype:[ \t]*/, ""); st=$0}
                   /^subnqn:/  {sub(/^subnqn:[ \t]*/, ""); print st "|" $0}' "$STATE/discover.out")
    echo "entries: $entries"
    nvm_nqns=$(grep -v 'discovery subsystem|' <<<"$entries" | cut -d'|' -f2 | sed 's/[ \t]*$//' | sort -u)
    [[ -n $entries ]] || fail "discovery log has no entries"
    [[ $nvm_nqns == "$nqn" ]] || fail "discovery log lists NVM subsystems [$(echo $nvm_nqns)], expected exactly [$nqn]"
    [[ $(grep -vc 'discovery subsystem|' <<<"$entries") == 1 ]] \
        || fail "discovery log has $(grep -vc 'discovery subsystem|' <<<"$entries") NVM subsystem entries, expected 1"
}

sc_connect() {
    disconnect
    dmesg_mark
    local dev
    dev=$(connect --nr-io-queues 2) || exit 1
    log "namespace device: /dev/$dev"
    local ctrl
    ctrl=$(our_ctrls | head -n1)
    x nvme list > "$STATE/list.out" 2>&1 || { cat "$STATE/list.out"; fail "nvme list failed"; }
    cat "$STATE/list.out"
    grep -q "/dev/$dev" "$STATE/list.out" || fail "nvme list does not show /dev/$dev"
    grep -q "$E2E_SERIAL" "$STATE/list.out" || fail "nvme list does not show serial $E2E_SERIAL"

    x nvme id-ctrl "/dev/$ctrl" > "$STATE/id-ctrl.out" 2>&1 || { cat "$STATE/id-ctrl.out"; fail "nvme id-ctrl /dev/$ctrl failed"; }
    cat "$STATE/id-ctrl.out"
    local sn subnqn
    sn=$(awk -F: '$1 ~ /^sn[ \t]*$/ {gsub(/^[ \t]+|[ \t]+$/, "", $2); print $2}' "$STATE/id-ctrl.out")
    subnqn=$(awk '/^subnqn[ \t]*:/ {sub(/^subnqn[ \t]*:[ \t]*/, ""); sub(/[ \t]+$/, ""); print}' "$STATE/id-ctrl.out")
    [[ $sn == "$E2E_SERIAL" ]] || fail "id-ctrl sn='$sn', expected '$E2E_SERIAL'"
    [[ $subnqn == "$E2E_NQN" ]] || fail "id-ctrl subnqn='$subnqn', expected '$E2E_NQN'"

    x nvme id-ns "/dev/$dev" > "$STATE/id-ns.out" 2>&1 || { cat "$STATE/id-ns.out"; fail "nvme id-ns /dev/$dev failed"; }
    cat "$STATE/id-ns.out"
    local nsze want
    nsze=$(awk '/^nsze[ \t]*:/ {print $3}' "$STATE/id-ns.out")
    want=$(( E2E_SIZE_BYTES / E2E_BLOCK_SIZE ))
    [[ -n $nsze ]] && (( nsze == want )) || fail "id-ns nsze=$nsze, expected $want ($E2E_SIZE_BYTES / $E2E_BLOCK_SIZE)"
    local bytes
    bytes=$(blockdev --getsize64 "/dev/$dev") || fail "blockdev --getsize64 /dev/$dev failed"
    (( bytes == E2E_SIZE_BYTES )) || fail "/dev/$dev is $bytes bytes, expected $E2E_SIZE_BYTES"

    # --nr-io-queues 2 with 2 guest CPUs: the kernel must have been granted and mapped 2 I/O queues.
    local mapped
    mapped=$(dmesg_since_mark | grep -o "$ctrl: mapped [0-9/]* default/read/poll queues" | tail -n1)
    log "queue mapping: ${mapped:-<none logged>}"
    [[ $mapped == *"mapped 2/0/0 "* ]] || fail "expected 2 I/O queues (mapped 2/0/0), dmesg says: '${mapped:-nothing}'"
}

sc_fio_verify_4k() {
    local dev
    dev=$(ensure_connected) || exit 1
    fio_verify "$dev" 4k 32m
}

sc_fio_verify_128k() {
    local dev
    dev=$(ensure_connected) || exit 1
    fio_verify "$dev" 128k 32m
}

sc_xfs() {
    local dev
    dev=$(ensure_connected) || exit 1
    mountpoint -q "$MNT" && umount "$MNT"
    x mkfs.xfs -f "/dev/$dev" || fail "mkfs.xfs /dev/$dev failed"
    x mount -t xfs "/dev/$dev" "$MNT" || fail "mount (1st) failed"
    x dd if=/dev/urandom of="$MNT/data.bin" bs=1M count=16 conv=fsync status=none || fail "writing $MNT/data.bin failed"
    local sum1 sum2
    sum1=$(sha256sum "$MNT/data.bin" | cut -d' ' -f1) || fail "sha256sum (1st) failed"
    x umount "$MNT" || fail "umount (1st) failed"
    sync; echo 3 > /proc/sys/vm/drop_caches # the 2nd checksum must come from the target
    x mount -t xfs "/dev/$dev" "$MNT" || fail "mount (2nd) failed"
    sum2=$(sha256sum "$MNT/data.bin" | cut -d' ' -f1) || fail "sha256sum after remount failed"
    log "sha256 before $sum1 after $sum2"
    [[ $sum1 == "$sum2" ]] || fail "checksum changed across umount/mount: $sum1 != $sum2"
    x umount "$MNT" || fail "umount (2nd) failed"
}

sc_reconnect_persistence() {
    local dev
    dev=$(ensure_connected) || exit 1
    # 4 MiB pattern at offset 200 MiB (inside the namespace).
    x dd if=/dev/urandom of="$STATE/pattern" bs=1M count=4 status=none || fail "cannot make pattern"
    x dd if="$STATE/pattern" of="/dev/$dev" bs=1M seek=200 oflag=direct conv=fsync status=none \
        || fail "writing pattern to /dev/$dev failed"
    disconnect
    [[ -z $(ns_dev) ]] || fail "block device still present after disconnect"
    dev=$(connect) || exit 1
    log "reconnected: /dev/$dev"
    x dd if="/dev/$dev" of="$STATE/readback" bs=1M skip=200 count=4 iflag=direct status=none \
        || fail "reading pattern back from /dev/$dev failed"
    x cmp "$STATE/pattern" "$STATE/readback" || fail "data written before disconnect differs after reconnect"
}

sc_digests() {
    disconnect
    dmesg_mark
    local dev
    dev=$(connect --hdr-digest --data-digest --nr-io-queues 2) || exit 1
    log "connected with header+data digests: /dev/$dev"
    fio_verify "$dev" 4k 4m
    fio_verify "$dev" 128k 8m
    if dmesg_since_mark_but_teardown | grep -i nvme | grep -iE 'digest|error|fail'; then
        fail "kernel logged nvme digest/error messages during digest I/O"
    fi
    disconnect
}

sc_host_denied() {
    need_nvme_tcp
    disconnect
    dmesg_mark
    local rc
    x timeout 60 nvme connect -t tcp -a "$E2E_ADDR" -s "$E2E_PORT" -n "$E2E_NQN" \
        --hostnqn "$E2E_BAD_HOSTNQN" --hostid "$E2E_BAD_HOSTID" "${CONNECT_OPTS[@]}"
    rc=$?
    log "nvme connect with $E2E_BAD_HOSTNQN exited rc=$rc; kernel says:"
    dmesg_since_mark
    local c leaked=""
    for c in $(our_ctrls); do
        [[ $(cat "/sys/class/nvme/$c/hostnqn" 2>/dev/null) == "$E2E_BAD_HOSTNQN" ]] && leaked+="$c "
    done
    if [[ -n $leaked ]]; then
        for c in $leaked; do echo 1 > "/sys/class/nvme/$c/delete_controller" 2>/dev/null; done
        fail "host $E2E_BAD_HOSTNQN was allowed to connect (controller(s) $leaked)"
    fi
    [[ $rc != 0 ]] || fail "nvme connect with disallowed host NQN succeeded (rc=0)"
    [[ $rc != 124 ]] || fail "nvme connect with disallowed host NQN timed out instead of being refused"
}

sc_discard() {
    local dev
    dev=$(ensure_connected) || exit 1
    mountpoint -q "$MNT" && umount "$MNT"
    log "discard limits: max_discard_segments=$(cat /sys/block/$dev/queue/max_discard_segments) discard_max_bytes=$(cat /sys/block/$dev/queue/discard_max_bytes) discard_granularity=$(cat /sys/block/$dev/queue/discard_granularity)"
    x blkdiscard -o 0 -l $(( 16 << 20 )) "/dev/$dev" || fail "blkdiscard -o 0 -l 16MiB /dev/$dev failed"
    x blkdiscard -o $(( 64 << 20 )) -l $(( 1 << 20 )) "/dev/$dev" || fail "blkdiscard -o 64MiB -l 1MiB /dev/$dev failed"
    x mkfs.xfs -f "/dev/$dev" || fail "mkfs.xfs failed"
    x mount -t xfs "/dev/$dev" "$MNT" || fail "mount failed"
    x dd if=/dev/urandom of="$MNT/junk" bs=1M count=8 conv=fsync status=none || fail "write failed"
    x rm -f "$MNT/junk" && sync
    x fstrim -v "$MNT" || fail "fstrim $MNT failed"
    x umount "$MNT" || fail "umount failed"
}

# resize_and_wait DEV BYTES: ask the host to resize our namespace, wait until DEV shows it.
resize_and_wait() {
    local dev=$1 want=$2 t0 t1
    t0=$(now)
    action resize "$want"
    if ! wait_for_size "$dev" "$want" "$RESIZE_WAIT_S"; then
        fail "/dev/$dev is still $(blockdev --getsize64 "/dev/$dev" 2>&1) bytes ${RESIZE_WAIT_S}s after the target was asked to resize it to $want (guest nvme dmesg since: $(dmesg_since_mark | grep -i nvme | tail -n3 | tr '\n' ' '))"
    fi
    t1=$(now)
    log "/dev/$dev is $want bytes, $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')s after the request"
}

# no_reconnect CTRL CNTLID DEV: the controller is the same association as before (same
# controller ID, live) and the kernel logged nothing about resets or reconnects since the mark.
no_reconnect() {
    local ctrl=$1 cntlid=$2 dev=$3 now_cntlid state
    now_cntlid=$(cat "/sys/class/nvme/$ctrl/cntlid" 2>/dev/null)
    state=$(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null)
    [[ $now_cntlid == "$cntlid" && $state == live ]] \
        || fail "controller changed: $ctrl cntlid ${now_cntlid:-gone} (was $cntlid), state ${state:-gone}"
    [[ $(ns_dev) == "$dev" ]] || fail "namespace device changed: /dev/$(ns_dev) (was /dev/$dev)"
    local bad
    bad=$(dmesg_since_mark | grep -iE 'new ctrl|creating [0-9]+ I/O queues|reconnect|error recovery|resetting|keep-alive|I/O tag .* timeout' | head -n3)
    [[ -z $bad ]] || fail "the kernel reset/reconnected the controller: $(tr '\n' ' ' <<<"$bad")"
}

cfs_write() { # cfs_write FILE VALUE: write a configfs attribute
    echo "+ echo $2 > $1"
    echo "$2" > "$1" || fail "writing '$2' to $1 failed"
}

# The kernel's nvmet-tcp target in the guest: subsystem CTL_NQN (allowed host: ours), a
# file-backed namespace on tmpfs (buffered I/O: tmpfs has no O_DIRECT in 6.1), port 1 on
# CTL_ADDR:CTL_PORT. Idempotent, so every control-* scenario can run alone.
nvmet_setup() {
    [[ -L $NVMET/ports/1/subsystems/$CTL_NQN ]] && return 0
    x modprobe nvmet || fail "modprobe nvmet failed"
    x modprobe nvmet-tcp || fail "modprobe nvmet-tcp failed"
    mountpoint -q /sys/kernel/config || x mount -t configfs configfs /sys/kernel/config \
        || fail "cannot mount configfs"
    [[ -d $NVMET ]] || fail "$NVMET missing after modprobe nvmet"
    x truncate -s "$CTL_SIZE_BYTES" "$CTL_FILE" || fail "cannot create $CTL_FILE"
    local sub=$NVMET/subsystems/$CTL_NQN port=$NVMET/ports/1
    mkdir -p "$NVMET/hosts/$E2E_HOSTNQN" "$sub" "$port" || fail "mkdir in $NVMET failed"
    cfs_write "$sub/attr_allow_any_host" 0
    cfs_write "$sub/attr_serial" "$CTL_SERIAL"
    [[ -L $sub/allowed_hosts/$E2E_HOSTNQN ]] || ln -s "$NVMET/hosts/$E2E_HOSTNQN" "$sub/allowed_hosts/$E2E_HOSTNQN" \
        || fail "cannot allow $E2E_HOSTNQN on $CTL_NQN"
    mkdir -p "$sub/namespaces/1" || fail "cannot create namespace 1"
    if [[ $(cat "$sub/namespaces/1/enable") != 1 ]]; then
        cfs_write "$sub/namespaces/1/device_path" "$CTL_FILE"
        cfs_write "$sub/namespaces/1/buffered_io" 1
        cfs_write "$sub/namespaces/1/enable" 1
    fi
    cfs_write "$port/addr_trtype" tcp
    cfs_write "$port/addr_adrfam" ipv4
    cfs_write "$port/addr_traddr" "$CTL_ADDR"
    cfs_write "$port/addr_trsvcid" "$CTL_PORT"
    x ln -s "$sub" "$port/subsystems/$CTL_NQN" || fail "cannot enable $CTL_NQN on port 1"
    dmesg | grep -i nvmet | tail -n3
}

nvmet_teardown() {
    [[ -d $NVMET ]] || return 0
    local sub=$NVMET/subsystems/$CTL_NQN
    rm -f "$NVMET/ports/1/subsystems/$CTL_NQN"
    rmdir "$NVMET/ports/1" 2>/dev/null
    [[ -d $sub/namespaces/1 ]] && { echo 0 > "$sub/namespaces/1/enable"; rmdir "$sub/namespaces/1"; }
    rm -f "$sub/allowed_hosts/$E2E_HOSTNQN"
    rmdir "$sub" "$NVMET/hosts/$E2E_HOSTNQN" 2>/dev/null
    rm -f "$CTL_FILE"
    return 0
}

# The authenticating subsystem AUTH_NQN of the guest's nvmet target: host AUTH_HOSTNQN allowed
# (its keys are set per scenario with nvmet_auth_host), a file-backed namespace on tmpfs, port
# AUTH_PORT_ID on CTL_ADDR:AUTH_PORT. Idempotent.
nvmet_auth_setup() {
    need_nvme_auth
    [[ -L $NVMET/ports/$AUTH_PORT_ID/subsystems/$AUTH_NQN ]] && return 0
    x modprobe nvmet || fail "modprobe nvmet failed"
    x modprobe nvmet-tcp || fail "modprobe nvmet-tcp failed"
    mountpoint -q /sys/kernel/config || x mount -t configfs configfs /sys/kernel/config \
        || fail "cannot mount configfs"
    [[ -d $NVMET ]] || fail "$NVMET missing after modprobe nvmet"
    x truncate -s "$AUTH_SIZE_BYTES" "$AUTH_FILE" || fail "cannot create $AUTH_FILE"
    local sub=$NVMET/subsystems/$AUTH_NQN port=$NVMET/ports/$AUTH_PORT_ID
    mkdir -p "$NVMET/hosts/$AUTH_HOSTNQN" "$sub" "$port" || fail "mkdir in $NVMET failed"
    [[ -e $NVMET/hosts/$AUTH_HOSTNQN/dhchap_key ]] \
        || fail "nvmet has no dhchap_key attribute for hosts: the guest kernel lacks CONFIG_NVME_TARGET_AUTH"
    cfs_write "$sub/attr_allow_any_host" 0
    cfs_write "$sub/attr_serial" "$AUTH_SERIAL"
    [[ -L $sub/allowed_hosts/$AUTH_HOSTNQN ]] || ln -s "$NVMET/hosts/$AUTH_HOSTNQN" "$sub/allowed_hosts/$AUTH_HOSTNQN" \
        || fail "cannot allow $AUTH_HOSTNQN on $AUTH_NQN"
    mkdir -p "$sub/namespaces/1" || fail "cannot create namespace 1"
    if [[ $(cat "$sub/namespaces/1/enable") != 1 ]]; then
        cfs_write "$sub/namespaces/1/device_path" "$AUTH_FILE"
        cfs_write "$sub/namespaces/1/buffered_io" 1
        cfs_write "$sub/namespaces/1/enable" 1
    fi
    cfs_write "$port/addr_trtype" tcp
    cfs_write "$port/addr_adrfam" ipv4
    cfs_write "$port/addr_traddr" "$CTL_ADDR"
    cfs_write "$port/addr_trsvcid" "$AUTH_PORT"
    x ln -s "$sub" "$port/subsystems/$AUTH_NQN" || fail "cannot enable $AUTH_NQN on port $AUTH_PORT_ID"
}

# nvmet_auth_host KEY [CTRL_KEY [HASH [DHGROUP]]]: what nvmet demands of AUTH_HOSTNQN. nvmet
# cannot clear a key once set, so the host entry is made anew (unlinked, removed, created,
# linked again); call it while the host is not connected. HASH (default hmac(sha256)) and
# DHGROUP (default null) are the ones nvmet picks from what the host offers.
nvmet_auth_host() {
    local key=$1 ctrl_key=${2:-} hash=${3:-"hmac(sha256)"} group=${4:-null}
    local host=$NVMET/hosts/$AUTH_HOSTNQN link=$NVMET/subsystems/$AUTH_NQN/allowed_hosts/$AUTH_HOSTNQN
    nvmet_auth_setup
    [[ -z $(ctrls_of_host "$AUTH_NQN" "$AUTH_HOSTNQN") ]] || disconnect_of "$AUTH_NQN"
    rm -f "$link" && rmdir "$host" || fail "cannot remove the nvmet host entry $AUTH_HOSTNQN"
    mkdir "$host" || fail "cannot create the nvmet host entry $AUTH_HOSTNQN"
    [[ -z $key ]] || cfs_write "$host/dhchap_key" "$key"
    [[ -z $ctrl_key ]] || cfs_write "$host/dhchap_ctrl_key" "$ctrl_key"
    cfs_write "$host/dhchap_hash" "$hash"
    cfs_write "$host/dhchap_dhgroup" "$group"
    ln -s "$host" "$link" || fail "cannot allow $AUTH_HOSTNQN on $AUTH_NQN again"
}

nvmet_auth_teardown() {
    [[ -d $NVMET ]] || return 0
    local sub=$NVMET/subsystems/$AUTH_NQN
    rm -f "$NVMET/ports/$AUTH_PORT_ID/subsystems/$AUTH_NQN"
    rmdir "$NVMET/ports/$AUTH_PORT_ID" 2>/dev/null
    [[ -d $sub/namespaces/1 ]] && { echo 0 > "$sub/namespaces/1/enable"; rmdir "$sub/namespaces/1"; }
    rm -f "$sub/allowed_hosts/$AUTH_HOSTNQN"
    rmdir "$sub" "$NVMET/hosts/$AUTH_HOSTNQN" 2>/dev/null
    rm -f "$AUTH_FILE"
    return 0
}

# Connect as AUTH_HOSTNQN to AUTH_NQN with nvme-connect options (secrets); prints the device.
auth_connect_ctl() { auth_connect "$CTL_ADDR" "$AUTH_PORT" "$AUTH_NQN" "$AUTH_HOSTNQN" "$AUTH_HOSTID" --nr-io-queues 2 "$@"; }
# A refusal by nvmet. nvmet sometimes closes the queue without completing the command that
# carried the failure (the host's AUTH_Failure2; once also after a wrong host secret: "nvmet: ctrl
# 1 fatal error occurred!"), and the host then waits for its admin timeout (60 s) before it fails
# the connect. So these run with nvme_core's admin_timeout at 10 s (it applies to controllers
# created afterwards). The auth-* scenarios against our target leave it as it is.
auth_refused_ctl() {
    local admin_timeout rc
    admin_timeout=$(cat "$ADMIN_TIMEOUT_PARAM") || fail "cannot read $ADMIN_TIMEOUT_PARAM"
    cfs_write "$ADMIN_TIMEOUT_PARAM" 10
    ( auth_connect_refused "$CTL_ADDR" "$AUTH_PORT" "$AUTH_NQN" "$AUTH_HOSTNQN" "$AUTH_HOSTID" "$@" )
    rc=$?
    cfs_write "$ADMIN_TIMEOUT_PARAM" "$admin_timeout"
    [[ $rc == 0 ]] || exit 1
}

# ---------------------------------------------------------------------------------------
# scenarios: run-time changes and failures

# The target grows the namespace while we are connected (and shrinks it back); the host must
# see both sizes through the Namespace Attribute Changed event, without any reconnect.
sc_resize() {
    local dev
    dev=$(ensure_connected) || exit 1
    local ctrl cntlid size0 big
    ctrl=$(our_ctrls | head -n1)
    cntlid=$(cat "/sys/class/nvme/$ctrl/cntlid")
    size0=$(blockdev --getsize64 "/dev/$dev") || fail "blockdev --getsize64 /dev/$dev failed"
    [[ $size0 == "$E2E_SIZE_BYTES" ]] || fail "/dev/$dev is $size0 bytes before the resize, expected $E2E_SIZE_BYTES"
    big=$(( E2E_SIZE_BYTES * 2 ))
    log "controller $ctrl cntlid $cntlid, /dev/$dev $size0 bytes; growing to $big"
    dmesg_mark
    resize_and_wait "$dev" "$big"
    no_reconnect "$ctrl" "$cntlid" "$dev"
    x nvme id-ns "/dev/$dev" > "$STATE/id-ns.out" 2>&1 || { cat "$STATE/id-ns.out"; fail "nvme id-ns /dev/$dev failed"; }
    local nsze
    nsze=$(awk '/^nsze[ \t]*:/ {print $3}' "$STATE/id-ns.out")
    [[ -n $nsze ]] && (( nsze == big / E2E_BLOCK_SIZE )) || fail "id-ns nsze=$nsze after growing, expected $(( big / E2E_BLOCK_SIZE ))"
    # The new space works: a pattern in the last 2 MiB, read back with O_DIRECT.
    x dd if=/dev/urandom of="$STATE/pattern" bs=1M count=2 status=none || fail "cannot make pattern"
    x dd if="$STATE/pattern" of="/dev/$dev" bs=1M seek=$(( big / 1048576 - 2 )) oflag=direct conv=fsync status=none \
        || fail "writing beyond the old end of /dev/$dev failed"
    x dd if="/dev/$dev" of="$STATE/readback" bs=1M skip=$(( big / 1048576 - 2 )) count=2 iflag=direct status=none \
        || fail "reading beyond the old end of /dev/$dev failed"
    x cmp "$STATE/pattern" "$STATE/readback" || fail "data written beyond the old end reads back differently"
    log "shrinking back to $E2E_SIZE_BYTES"
    resize_and_wait "$dev" "$E2E_SIZE_BYTES"
    no_reconnect "$ctrl" "$cntlid" "$dev"
    dmesg_since_mark | grep -i 'capacity change'
    return 0
}

# The connection vanishes without a disconnect (the guest's NIC goes down): the target must
# free the controller when its keep-alive timer expires. The guest marks the moment; run.sh
# checks target.log for the teardown and its delay (host-side verdict, see run.sh).
sc_keepalive_expiry() {
    need_nvme_tcp
    disconnect
    local dev ctrl cntlid
    dev=$(connect --keep-alive-tmo="$E2E_KATO") || exit 1
    ctrl=$(our_ctrls | head -n1)
    cntlid=$(cat "/sys/class/nvme/$ctrl/cntlid")
    [[ -n $cntlid ]] || fail "no cntlid for $ctrl"
    [[ -e /sys/class/net/eth0 ]] || fail "the guest has no eth0"
    log "controller $ctrl cntlid $cntlid, kato ${E2E_KATO}s (sysfs kato: $(cat "/sys/class/nvme/$ctrl/kato" 2>/dev/null || echo n/a))"
    dmesg_mark
    action keepalive-mark "$cntlid" "$E2E_KATO"
    x ip link set dev eth0 down || fail "ip link set dev eth0 down failed"
    sleep $(( E2E_KATO + 3 ))
    action keepalive-check "$cntlid" "$E2E_KATO"
    # Always bring the network back before anything can fail.
    x ip link set dev eth0 up
    x ip route replace default via 10.0.2.2 dev eth0
    log "guest side while the link was down:"
    dmesg_since_mark | grep -i nvme
    # The initiator's own keep-alive failed too; it reconnects now that the link is back,
    # which the target must accept (a new controller).
    wait_for_ctrl_state "$ctrl" live 30 \
        || fail "$ctrl did not reconnect within 30s after the link came back (state $(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null || echo gone))"
    log "reconnected: $ctrl cntlid $(cat "/sys/class/nvme/$ctrl/cntlid")"
    disconnect
}

# ---------------------------------------------------------------------------------------
# postgres: vanilla PostgreSQL 15 (from the guest image) on a file system on our namespace.
# The cluster lives in $PG_DATA on the NVMe volume; the server log and the Unix socket stay
# on the guest's tmpfs (readable even if the volume fails). No TCP: listen_addresses=''.

PG_BIN=/usr/lib/postgresql/15/bin
PG_DATA=$MNT/pgdata
PG_SOCK=$STATE/pgsock
PG_LOG=$STATE/postgres.log
PG_SCALE=2                             # pgbench -i -s 2: 200000 rows in pgbench_accounts
PG_ACCOUNTS=$(( PG_SCALE * 100000 ))
PG_BENCH_SECONDS=5
PG_INIT_TIMEOUT=300                    # bound for initdb and pgbench -i (TCG is slow)

# Run a PostgreSQL program as the postgres user, bounded: pg_run SECONDS PROGRAM ARGS...
pg_run() { local t=$1 p=$2; shift 2; x timeout -k 5 "$t" runuser -u postgres -- "$PG_BIN/$p" "$@"; }
# One SQL command string, unaligned tuples only, on the Unix socket.
pg_sql() { timeout -k 5 120 runuser -u postgres -- "$PG_BIN/psql" -h "$PG_SOCK" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
pg_log_tail() { tail -n "${1:-6}" "$PG_LOG" 2>/dev/null | sed 's/^[0-9-]* [0-9:.]* [A-Z]* //' | cut -c1-160 | tr '\n' '|'; }
# Fail with the last lines of the server log in the reason (the whole log goes to the console).
pg_fail() {
    echo "===== $PG_LOG ====="; cat "$PG_LOG" 2>/dev/null; echo "===== end of $PG_LOG ====="
    fail "$* [postgres log: $(pg_log_tail)]"
}
pg_running() {
    [[ -f $PG_DATA/postmaster.pid ]] \
        && timeout 20 runuser -u postgres -- "$PG_BIN/pg_ctl" status -D "$PG_DATA" > /dev/null 2>&1
}

pg_start() { # pg_start WHAT
    pg_run 100 pg_ctl start -D "$PG_DATA" -l "$PG_LOG" -w -t 90 || pg_fail "pg_ctl start ($1) failed (rc=$?)"
    pg_sql 'SELECT 1' > /dev/null || pg_fail "no answer on $PG_SOCK after pg_ctl start ($1)"
}
# Clean shutdown (-m fast: a shutdown checkpoint), and pg_controldata agrees that it was clean.
pg_stop() { # pg_stop WHAT
    pg_run 130 pg_ctl stop -D "$PG_DATA" -m fast -w -t 120 || pg_fail "pg_ctl stop ($1) failed (rc=$?)"
    local st
    st=$(timeout 20 runuser -u postgres -- "$PG_BIN/pg_controldata" -D "$PG_DATA" 2>&1 | sed -n 's/^Database cluster state: *//p')
    log "pg_controldata after stop ($1): state '$st'"
    [[ $st == "shut down" ]] || pg_fail "cluster state after pg_ctl stop ($1) is '$st', expected 'shut down'"
}

# EXIT trap of the scenario: whatever happened, no server is left running on the volume and
# the volume is unmounted (bounded), so the next scenario can disconnect.
pg_cleanup() {
    if [[ -f $PG_DATA/postmaster.pid ]]; then
        local pid
        pid=$(head -n1 "$PG_DATA/postmaster.pid" 2>/dev/null)
        echo "pg_cleanup: server still running (pid ${pid:-?}); immediate stop"
        pg_running && timeout -k 5 40 runuser -u postgres -- "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m immediate -w -t 30
        if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
    fi
    local i
    for i in $(seq 1 50); do pgrep -u postgres > /dev/null || break; sleep 0.2; done
    pkill -KILL -u postgres 2>/dev/null
    if mountpoint -q "$MNT"; then
        timeout 60 umount "$MNT" || { echo "pg_cleanup: umount $MNT failed; lazy unmount"; umount -l "$MNT"; }
    fi
    return 0
}

# The state that must survive: row count (first word), balances, history, digest of every account.
pg_state() {
    pg_sql "SELECT (SELECT count(*) FROM pgbench_accounts)
                   || ' sum(abalance)=' || (SELECT sum(abalance) FROM pgbench_accounts)
                   || ' history=' || (SELECT count(*) FROM pgbench_history)
                   || ' md5=' || (SELECT md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts)"
}


sc_postgres() {
    [[ -x $PG_BIN/postgres ]] || fail "$PG_BIN/postgres missing: the guest image has no PostgreSQL 15 (rebuild it)"
    need_nvme_tcp
    disconnect
    trap pg_cleanup EXIT
    # POSIX shared memory for the server (the init only created the directory).
    mountpoint -q /dev/shm || x mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm || fail "cannot mount /dev/shm"
    mkdir -p "$PG_SOCK" && chown postgres:postgres "$PG_SOCK" || fail "cannot create $PG_SOCK"
    : > "$PG_LOG" && chown postgres:postgres "$PG_LOG" || fail "cannot create $PG_LOG"
    dmesg_mark
    local dev t0 rc out
    dev=$(connect) || exit 1
    log "namespace device: /dev/$dev ($(blockdev --getsize64 "/dev/$dev") bytes)"
    x mkfs.xfs -f -q "/dev/$dev" || fail "mkfs.xfs /dev/$dev failed"
    x mount -t xfs "/dev/$dev" "$MNT" || fail "mount /dev/$dev failed"
    mkdir -p "$PG_DATA" && chown postgres:postgres "$PG_DATA" && chmod 700 "$PG_DATA" || fail "cannot create $PG_DATA"

    t0=$(now)
    pg_run "$PG_INIT_TIMEOUT" initdb -D "$PG_DATA" -U postgres -A trust -E UTF8 --no-locale --no-instructions \
        > "$STATE/initdb.out" 2>&1
    rc=$?
    cat "$STATE/initdb.out"
    [[ $rc == 0 ]] || fail "initdb on /dev/$dev failed (rc=$rc): $(tail -n 3 "$STATE/initdb.out" | tr '\n' '|')"
    log "initdb took $(secs_since "$t0")s"
    # Unix socket only, on the guest's tmpfs. Everything else: PostgreSQL's defaults (fsync on).
    {
        echo "# e2e (tests/e2e/scenarios/nvme-tcp.sh)"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$PG_SOCK'"
    } >> "$PG_DATA/postgresql.conf" || fail "cannot write $PG_DATA/postgresql.conf"
    pg_start "1st"
    log "server: $(pg_sql 'SELECT version()'); data_directory $(pg_sql 'SHOW data_directory'); fsync $(pg_sql 'SHOW fsync')"

    t0=$(now)
    pg_run "$PG_INIT_TIMEOUT" pgbench -h "$PG_SOCK" -i -s "$PG_SCALE" postgres > "$STATE/pgbench-i.out" 2>&1
    rc=$?
    cat "$STATE/pgbench-i.out"
    [[ $rc == 0 ]] || pg_fail "pgbench -i -s $PG_SCALE failed (rc=$rc): $(tail -n 2 "$STATE/pgbench-i.out" | tr '\n' '|')"
    log "pgbench -i -s $PG_SCALE took $(secs_since "$t0")s"

    pg_run $(( PG_BENCH_SECONDS + 60 )) pgbench -h "$PG_SOCK" -c 2 -j 2 -T "$PG_BENCH_SECONDS" postgres \
        > "$STATE/pgbench.out" 2>&1
    rc=$?
    cat "$STATE/pgbench.out"
    [[ $rc == 0 ]] || pg_fail "pgbench -T $PG_BENCH_SECONDS failed (rc=$rc): $(tail -n 2 "$STATE/pgbench.out" | tr '\n' '|')"
    local done_tx failed_tx
    done_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$STATE/pgbench.out")
    failed_tx=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$STATE/pgbench.out")
    [[ -n $done_tx ]] && (( done_tx > 0 )) || pg_fail "pgbench -T $PG_BENCH_SECONDS processed no transactions ('$done_tx')"
    [[ $failed_tx == 0 ]] || pg_fail "pgbench -T $PG_BENCH_SECONDS: '$failed_tx' failed transactions"
    log "pgbench -T $PG_BENCH_SECONDS: $done_tx transactions, $(grep -m1 '^tps' "$STATE/pgbench.out")"

    local state1 state2
    state1=$(pg_state) || pg_fail "reading the pgbench state failed"
    log "state before the round trip: count=$state1"
    [[ ${state1%% *} == "$PG_ACCOUNTS" ]] \
        || pg_fail "SELECT count(*) FROM pgbench_accounts = ${state1%% *}, expected $PG_ACCOUNTS"
    pg_stop "1st"

    # Round trip through the target: unmount, disconnect, connect again (a new controller).
    x umount "$MNT" || fail "umount after the 1st stop failed"
    disconnect
    [[ -z $(ns_dev) ]] || fail "block device still present after disconnect"
    dev=$(connect) || exit 1
    log "reconnected: /dev/$dev"
    # The file system itself came back consistent (read-only check, before mounting).
    x timeout 120 xfs_repair -n "/dev/$dev" > "$STATE/xfs_repair.out" 2>&1
    rc=$?
    cat "$STATE/xfs_repair.out"
    [[ $rc == 0 ]] || fail "xfs_repair -n /dev/$dev after reconnect failed (rc=$rc): $(tail -n 2 "$STATE/xfs_repair.out" | tr '\n' '|')"
    x mount -t xfs "/dev/$dev" "$MNT" || fail "mount /dev/$dev after reconnect failed"
    local log_lines
    log_lines=$(wc -l < "$PG_LOG")
    pg_start "2nd, after reconnect"
    # A cleanly stopped cluster starts without crash recovery.
    if tail -n +"$(( log_lines + 1 ))" "$PG_LOG" | grep -E 'not properly shut down|redo starts|automatic recovery'; then
        pg_fail "PostgreSQL ran crash recovery after a clean shutdown"
    fi
    state2=$(pg_state) || pg_fail "reading the pgbench state after reconnect failed"
    log "state after the round trip:  count=$state2"
    [[ $state2 == "$state1" ]] \
        || pg_fail "data changed across stop/umount/disconnect/connect/mount/start: before [$state1], after [$state2]"
    # The primary key index agrees with the table (amcheck, heapallindexed).
    out=$(pg_sql "CREATE EXTENSION IF NOT EXISTS amcheck; SELECT bt_index_check('pgbench_accounts_pkey', true)" 2>&1) \
        || pg_fail "amcheck bt_index_check(pgbench_accounts_pkey) failed: $(tr '\n' '|' <<<"$out")"
    pg_stop "2nd"
    echo "===== $PG_LOG ====="; cat "$PG_LOG"; echo "===== end of $PG_LOG ====="
    log "space used on the namespace: $(df -h --output=used,size "$MNT" | tail -n1); $PG_DATA: $(du -sh "$PG_DATA" | cut -f1)"
    x umount "$MNT" || fail "umount after the 2nd stop failed"
    disconnect
    local bad
    bad=$(dmesg_since_mark_but_teardown | grep -iE '(nvme|xfs|blk_update_request|buffer i/o).*(error|corrupt|timeout|reset|shut ?down|fail)' | head -n3)
    [[ -z $bad ]] || fail "the kernel logged errors during the postgres scenario: $(tr '\n' ' ' <<<"$bad")"
}

# ---------------------------------------------------------------------------------------
# control: the same basic scenarios against the Linux kernel's own nvmet-tcp target in the
# guest, so that a failure can be told apart (ours vs. the initiator/guest/harness).

sc_control_discover() {
    need_nvme_tcp
    nvmet_setup
    discover_check "$CTL_ADDR" "$CTL_PORT" "$CTL_NQN"
}

sc_control_connect() {
    nvmet_setup
    disconnect_of "$CTL_NQN"
    local dev ctrl
    dev=$(connect_to "$CTL_ADDR" "$CTL_PORT" "$CTL_NQN" --nr-io-queues 2) || exit 1
    ctrl=$(ctrls_of "$CTL_NQN" | head -n1)
    log "kernel target: /dev/$dev on $ctrl"
    x nvme id-ctrl "/dev/$ctrl" > "$STATE/id-ctrl.out" 2>&1 || { cat "$STATE/id-ctrl.out"; fail "nvme id-ctrl /dev/$ctrl failed"; }
    local sn bytes
    sn=$(awk -F: '$1 ~ /^sn[ \t]*$/ {gsub(/^[ \t]+|[ \t]+$/, "", $2); print $2}' "$STATE/id-ctrl.out")
    [[ $sn == "$CTL_SERIAL" ]] || fail "id-ctrl sn='$sn', expected '$CTL_SERIAL'"
    bytes=$(blockdev --getsize64 "/dev/$dev") || fail "blockdev --getsize64 /dev/$dev failed"
    (( bytes == CTL_SIZE_BYTES )) || fail "/dev/$dev is $bytes bytes, expected $CTL_SIZE_BYTES"
}

sc_control_fio_verify_4k() {
    nvmet_setup
    local dev
    dev=$(ns_dev_of "$CTL_NQN") || dev=$(connect_to "$CTL_ADDR" "$CTL_PORT" "$CTL_NQN") || exit 1
    fio_verify "$dev" 4k 8m
}

sc_control_disconnect() {
    nvmet_setup
    [[ -n $(ctrls_of "$CTL_NQN") ]] || connect_to "$CTL_ADDR" "$CTL_PORT" "$CTL_NQN" > /dev/null || exit 1
    disconnect_of "$CTL_NQN"
    [[ -z $(ns_dev_of "$CTL_NQN") ]] || fail "block device still present after disconnect"
}

# ---------------------------------------------------------------------------------------
# control-auth: NVMe in-band authentication (DH-HMAC-CHAP) between the guest's own host and its
# nvmet target (--kernel 6.12). It shows the kernel, nvme-cli and the harness can do what the
# authentication scenarios against our target will need.

# The secrets nvme-cli makes are what the kernel and the specification expect.
sc_control_auth_keys() {
    need_nvme_auth
    local hmac len k k2 want got
    for hmac in 0 1 2 3; do
        for len in 32 48 64; do
            # A transformed key has the length of its hash.
            (( hmac == 0 || len == 16 + 16 * hmac )) || continue
            k=$(dhchap_gen_key "$hmac" "$len" "$AUTH_HOSTNQN") || exit 1
            log "gen-dhchap-key --hmac=$hmac --key-length=$len: ${k:0:10}... ($(( ${#k} - 11 )) base64 characters)"
        done
    done
    k=$(dhchap_gen_key 0 32) || exit 1
    k2=$(dhchap_gen_key 0 32) || exit 1
    [[ $k != "$k2" ]] || fail "two nvme gen-dhchap-key runs gave the same secret"
    # A given key: nvme-cli's representation equals the one computed here (base64 of the key
    # and its CRC-32, little-endian).
    want=$(dhchap_expected 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f) || fail "python3 failed"
    got=$(nvme gen-dhchap-key --secret=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f --hmac=0 2>&1) \
        || fail "nvme gen-dhchap-key --secret=... failed: $got"
    log "key 00..1f: nvme-cli $got, expected $want"
    [[ $got == "$want" ]] || fail "nvme gen-dhchap-key --secret=00..1f --hmac=0 gave $got, expected $want"
    # With --hmac=1 nvme-cli 2.3 prints the key already transformed, HMAC-SHA-256(key, NQN ||
    # "NVMe-over-Fabrics"), tagged 01 (and the kernel transforms a 01 key once more when it uses it).
    want=$(python3 -c 'import base64, hashlib, hmac, sys, zlib
k = hmac.new(bytes.fromhex(sys.argv[1]), sys.argv[2].encode() + b"NVMe-over-Fabrics", hashlib.sha256).digest()
print("DHHC-1:01:" + base64.b64encode(k + zlib.crc32(k).to_bytes(4, "little")).decode() + ":")' \
        000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f "$AUTH_HOSTNQN") || fail "python3 failed"
    got=$(nvme gen-dhchap-key --secret=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f --hmac=1 --nqn="$AUTH_HOSTNQN" 2>&1) \
        || fail "nvme gen-dhchap-key --secret=... --hmac=1 failed: $got"
    log "key 00..1f, --hmac=1 --nqn=$AUTH_HOSTNQN: nvme-cli $got, expected $want"
    [[ $got == "$want" ]] || fail "nvme gen-dhchap-key --secret=00..1f --hmac=1 --nqn=$AUTH_HOSTNQN gave $got, expected $want"
    # A damaged secret (one base64 character changed: the CRC no longer matches) is refused.
    local bad
    bad=${k:0:12}$([[ ${k:12:1} == A ]] && echo B || echo A)${k:13}
    dhchap_key_check "$bad" > /dev/null && fail "a secret with a wrong CRC-32 passed the checks: $bad"
    nvme check-dhchap-key --key="$bad" > /dev/null 2>&1 && fail "nvme check-dhchap-key accepted a secret with a wrong CRC-32: $bad"
    return 0
}

# The host authenticates with the right secret (nvmet's default hash and group), its I/O
# queues too, and the secret shows in sysfs.
sc_control_auth_connect() {
    need_nvme_auth
    local key dev ctrl mark res
    key=$(dhchap_gen_key 0 32) || exit 1
    nvmet_auth_host "$key"
    mark=$(dmesg | wc -l)
    dev=$(auth_connect_ctl --dhchap-secret="$key") || exit 1
    ctrl=$(ctrls_of_host "$AUTH_NQN" "$AUTH_HOSTNQN" | head -n1)
    res=$(auth_dmesg_result "$mark")
    log "$ctrl: ${res:-no 'authenticated' line}; /dev/$dev"
    [[ $res == "qid 0: authenticated with hash hmac(sha256) dhgroup null" ]] \
        || fail "expected 'qid 0: authenticated with hash hmac(sha256) dhgroup null' in dmesg, got '${res:-nothing}'"
    [[ $(cat "/sys/class/nvme/$ctrl/dhchap_secret") == "$key" ]] \
        || fail "/sys/class/nvme/$ctrl/dhchap_secret is '$(cat "/sys/class/nvme/$ctrl/dhchap_secret")', expected the secret connected with"
    [[ $(cat "/sys/class/nvme/$ctrl/dhchap_ctrl_secret") == none ]] \
        || fail "/sys/class/nvme/$ctrl/dhchap_ctrl_secret is '$(cat "/sys/class/nvme/$ctrl/dhchap_ctrl_secret")', expected none (unidirectional)"
    (( $(blockdev --getsize64 "/dev/$dev") == AUTH_SIZE_BYTES )) || fail "/dev/$dev is not $AUTH_SIZE_BYTES bytes"
    fio_verify "$dev" 4k 4m
    disconnect_of "$AUTH_NQN"
}

# Every hash x DH group the host offers (Linux offers all three hashes and all six groups in its
# Negotiate message): nvmet picks the configured pair, and the host says it authenticated with
# exactly that.
sc_control_auth_matrix() {
    need_nvme_auth
    local key hash h group mark res t0 times=""
    key=$(dhchap_gen_key 0 48) || exit 1
    for hash in "${AUTH_HASHES[@]}"; do
        for group in "${AUTH_DHGROUPS[@]}"; do
            nvmet_auth_host "$key" "" "$hash" "$group"
            mark=$(dmesg | wc -l)
            t0=$(now)
            # One I/O queue: every queue authenticates, and the big groups are slow under TCG.
            auth_connect "$CTL_ADDR" "$AUTH_PORT" "$AUTH_NQN" "$AUTH_HOSTNQN" "$AUTH_HOSTID" \
                --nr-io-queues 1 --dhchap-secret="$key" > /dev/null || exit 1
            h=${hash#hmac(}
            times+="${h%)}/$group=$(secs_since "$t0")s "
            res=$(auth_dmesg_result "$mark")
            [[ $res == "qid 0: authenticated with hash $hash dhgroup $group" ]] \
                || fail "nvmet configured for $hash/$group: the host logged '${res:-nothing}'"
            disconnect_of "$AUTH_NQN"
        done
    done
    info "connect-seconds ${times% }"
}

# Bidirectional: the host also authenticates the controller (--dhchap-ctrl-secret); a host
# with a wrong controller secret refuses the controller (nvmet tears the queue down as soon as
# the host's Failure2 arrives, without completing that AUTH_SEND: see auth_refused_ctl).
sc_control_auth_bidirectional() {
    need_nvme_auth
    local key ckey wrong dev ctrl mark res
    key=$(dhchap_gen_key 0 32) || exit 1
    ckey=$(dhchap_gen_key 0 32) || exit 1
    wrong=$(dhchap_gen_key 0 32) || exit 1
    nvmet_auth_host "$key" "$ckey" "hmac(sha384)" ffdhe2048
    mark=$(dmesg | wc -l)
    dev=$(auth_connect_ctl --dhchap-secret="$key" --dhchap-ctrl-secret="$ckey") || exit 1
    ctrl=$(ctrls_of_host "$AUTH_NQN" "$AUTH_HOSTNQN" | head -n1)
    res=$(auth_dmesg_result "$mark")
    [[ $res == "qid 0: authenticated with hash hmac(sha384) dhgroup ffdhe2048" ]] \
        || fail "expected 'qid 0: authenticated with hash hmac(sha384) dhgroup ffdhe2048', got '${res:-nothing}'"
    grep -q "$ctrl: qid 0: controller authenticated" <<<"$(dmesg_since "$mark")" \
        || fail "no '$ctrl: qid 0: controller authenticated' in dmesg"
    [[ $(cat "/sys/class/nvme/$ctrl/dhchap_ctrl_secret") == "$ckey" ]] \
        || fail "/sys/class/nvme/$ctrl/dhchap_ctrl_secret is not the controller secret connected with"
    fio_verify "$dev" 4k 4m
    disconnect_of "$AUTH_NQN"
    mark=$(dmesg | wc -l)
    auth_refused_ctl --dhchap-secret="$key" --dhchap-ctrl-secret="$wrong"
    grep -q 'qid 0: controller authentication failed' <<<"$(dmesg_since "$mark")" \
        || fail "the host did not log 'controller authentication failed' for a wrong controller secret"
}

# The wrong host secret is refused.
sc_control_auth_wrong_secret() {
    need_nvme_auth
    local key wrong
    key=$(dhchap_gen_key 0 32) || exit 1
    wrong=$(dhchap_gen_key 0 32) || exit 1
    nvmet_auth_host "$key"
    auth_refused_ctl --dhchap-secret="$wrong"
}

# No secret at all is refused by a controller that demands authentication (the host gives up
# by itself: "qid 0: no key", ENOKEY). A controller secret alone is no better.
sc_control_auth_no_secret() {
    need_nvme_auth
    local key ckey mark
    key=$(dhchap_gen_key 0 32) || exit 1
    ckey=$(dhchap_gen_key 0 32) || exit 1
    nvmet_auth_host "$key" "$ckey"
    mark=$(dmesg | wc -l)
    auth_refused_ctl
    grep -q 'qid 0: no key' <<<"$(dmesg_since "$mark")" || fail "the host did not log 'qid 0: no key'"
    auth_refused_ctl --dhchap-ctrl-secret="$ckey"
}

# A controller that does not ask for authentication: a host with a secret (even with a
# controller secret) connects without authenticating. The Linux host authenticates only when
# the Connect response asks for it.
sc_control_auth_not_required() {
    need_nvme_auth
    local key ckey dev mark
    key=$(dhchap_gen_key 0 32) || exit 1
    ckey=$(dhchap_gen_key 0 32) || exit 1
    nvmet_auth_host ""
    mark=$(dmesg | wc -l)
    dev=$(auth_connect_ctl --dhchap-secret="$key") || exit 1
    dmesg | tail -n +"$(( mark + 1 ))" | grep -E 'authenticat' && fail "the host authenticated to a controller that did not ask for it"
    fio_verify "$dev" 4k 4m
    disconnect_of "$AUTH_NQN"
    auth_connect_ctl --dhchap-secret="$key" --dhchap-ctrl-secret="$ckey" > /dev/null || exit 1
    dmesg | tail -n +"$(( mark + 1 ))" | grep -E 'authenticat' && fail "the host authenticated to a controller that did not ask for it (with a controller secret)"
    disconnect_of "$AUTH_NQN"
}

# Rotation: nvmet gets a new secret; the connected host is given it through sysfs and
# re-authenticates on the same controller; afterwards only the new secret connects.
sc_control_auth_rotate() {
    need_nvme_auth
    local old new dev ctrl cntlid mark
    old=$(dhchap_gen_key 0 32) || exit 1
    new=$(dhchap_gen_key 0 32) || exit 1
    nvmet_auth_host "$old" "" "hmac(sha256)" ffdhe2048
    dev=$(auth_connect_ctl --dhchap-secret="$old") || exit 1
    ctrl=$(ctrls_of_host "$AUTH_NQN" "$AUTH_HOSTNQN" | head -n1)
    cntlid=$(cat "/sys/class/nvme/$ctrl/cntlid")
    cfs_write "$NVMET/hosts/$AUTH_HOSTNQN/dhchap_key" "$new"
    mark=$(dmesg | wc -l)
    echo "+ echo <new secret> > /sys/class/nvme/$ctrl/dhchap_secret"
    echo "$new" > "/sys/class/nvme/$ctrl/dhchap_secret" || fail "writing the new secret to /sys/class/nvme/$ctrl/dhchap_secret failed"
    local res=""
    for _ in $(seq 1 100); do # 20 s
        res=$(auth_dmesg_result "$mark")
        [[ -n $res ]] && break
        grep -q "$ctrl: qid 0: authentication failed" <<<"$(dmesg_since "$mark")" && break
        sleep 0.2
    done
    dmesg | tail -n +"$(( mark + 1 ))" | grep -iE 'nvme|auth'
    grep -q "$ctrl: re-authenticating controller" <<<"$(dmesg_since "$mark")" \
        || fail "no '$ctrl: re-authenticating controller' after writing dhchap_secret"
    [[ -n $res ]] || fail "$ctrl did not re-authenticate with the new secret within 20s: $(dmesg | tail -n +"$(( mark + 1 ))" | grep -i "$ctrl" | tail -n 2 | tr '\n' ' ')"
    [[ $(cat "/sys/class/nvme/$ctrl/cntlid") == "$cntlid" && $(cat "/sys/class/nvme/$ctrl/state") == live ]] \
        || fail "$ctrl changed during re-authentication: cntlid $(cat "/sys/class/nvme/$ctrl/cntlid" 2>/dev/null) (was $cntlid), state $(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null)"
    [[ $(cat "/sys/class/nvme/$ctrl/dhchap_secret") == "$new" ]] || fail "/sys/class/nvme/$ctrl/dhchap_secret is not the new secret"
    fio_verify "$dev" 4k 4m
    disconnect_of "$AUTH_NQN"
    auth_refused_ctl --dhchap-secret="$old"
    auth_connect_ctl --dhchap-secret="$new" > /dev/null || exit 1
    disconnect_of "$AUTH_NQN"
}

# ---------------------------------------------------------------------------------------
# auth: NVMe in-band authentication (DH-HMAC-CHAP) between the guest's host and OUR target
# (--kernel 6.12). run.sh runs a second instance of the target for them (64 MiB in memory,
# E2E_AUTH_NQN on 10.0.2.2:E2E_AUTH_PORT, --driver as given to run.sh); every scenario restarts
# it with the options it needs (auth_target), changes its secrets at run time through its
# control FIFO (auth_ctl) and reads its log (auth_log_count). Two host identities of their own
# (the kernel keeps host NQN and host ID one-to-one); the main identity is not used here.
OT_HOST1=nqn.2026-01.io.xatastor:e2e-auth-host1
OT_HOSTID1=6a0f3e5c-2b1d-4c8e-9f70-0e2e000000b1
OT_HOST2=nqn.2026-01.io.xatastor:e2e-auth-host2
OT_HOSTID2=6a0f3e5c-2b1d-4c8e-9f70-0e2e000000b2
# The target's preference when not told otherwise (nvmeof_target::auth::AuthConfig::default()):
# the strongest hash and ffdhe3072; the Linux host offers everything, so these are chosen.
OT_DEFAULT_HASH="hmac(sha512)"
OT_DEFAULT_GROUP=ffdhe3072

need_auth_target() {
    need_nvme_auth
    [[ -n ${E2E_AUTH_PORT:-} && -n ${E2E_AUTH_NQN:-} ]] \
        || fail "run.sh started no second target (E2E_AUTH_PORT unset; the scenario file needs '# e2e-needs: auth-target')"
    auth_warm_dhgroups
}

# The guest kernel sets up an FFDHE group (crypto_alloc_kpp("ffdheNNNN(dh)"), with its self-test)
# the first time it is used, which under TCG takes seconds (6.7 s for ffdhe4096 in one run): the
# host then sends nothing during its first authentication with that group, longer than the
# 5 s keep-alive timeout that the target (like Linux nvmet) runs from the Connect on, and the
# target tears the controller down. nvmet's configfs sets a group up when it is configured
# (crypto_has_kpp), outside any connection: every group is configured there once per boot
# (control-auth-matrix does it too), so that the auth-* scenarios measure our target.
auth_warm_dhgroups() {
    local g t0 done_=""
    for g in "${AUTH_DHGROUPS[@]}"; do
        [[ $g == null ]] && continue
        grep -qE "^name +: $g\(dh\)\$" /proc/crypto && continue
        t0=$(now)
        nvmet_auth_host "" "" "hmac(sha256)" "$g"
        done_+="$g $(secs_since "$t0")s, "
    done
    [[ -z $done_ ]] || log "DH groups set up in the guest kernel: ${done_%, }"
}

# auth_target [OPTIONS...]: (re)start the second target with these options (besides run.sh's:
# port, NQN, memory volume, control FIFO, log); fails unless it serves again. Call it while no
# host of ours is connected to it.
auth_target() {
    local r
    need_auth_target
    disconnect_of "$E2E_AUTH_NQN"
    r=$(action_wait auth-target "$@") || exit 1
    [[ $r == "ok serving on "* ]] || fail "run.sh could not (re)start the auth target with '$(sed -E 's/(DHHC-1:0[0-3]:.{4})[^: ]*:/\1...:/g' <<<"$*")': $r"
}

# auth_ctl COMMAND...: one command on the second target's control FIFO; fails unless it says ok.
auth_ctl() {
    local r
    r=$(action_wait auth-ctl "$@") || exit 1
    [[ $r == "control: ok "* ]] || fail "auth target control command '${1:-} ${2:-}' failed: $r"
}

# auth_log_count REGEX: lines of the second target's log since its last start that match REGEX.
auth_log_count() {
    local r
    r=$(action_wait auth-log "$1") || exit 1
    [[ $r =~ ^[0-9]+\ \| ]] || fail "unexpected answer to auth-log '$1': $r"
    echo "${r%% *}"
}

# Four of the host's per-queue authentication steps (nvme_queue_auth_work's dev_dbg lines
# "qid N send negotiate", "receive success1", "send success2", "send failure2") go to dmesg too;
# not the others (hex dumps of challenges, responses, DH values).
auth_dyndbg() {
    local ctl=/proc/dynamic_debug/control f
    [[ -w $ctl ]] || { mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug; ctl=/sys/kernel/debug/dynamic_debug/control; }
    [[ -w $ctl ]] || fail "no dynamic debug control (CONFIG_DYNAMIC_DEBUG) in the guest kernel"
    need_nvme_tcp
    for f in "send negotiate" "receive success1" "send success2" "send failure2"; do
        echo "file drivers/nvme/host/auth.c format \"$f\" +p" > "$ctl" \
            || fail "cannot enable dynamic debug for '$f' in drivers/nvme/host/auth.c"
    done
}

# auth_queues_checked MARK CTRL NQUEUES [success2]: since dmesg line MARK, the host ran a
# DH-HMAC-CHAP transaction on every queue of CTRL (qid 0 .. NQUEUES) that reached Success1 (and
# Success2 for a bidirectional one) without a Failure2 or error. Needs auth_dyndbg.
auth_queues_checked() {
    local mark=$1 ctrl=$2 n=$3 step2=${4:-} q out
    out=$(dmesg | tail -n +"$(( mark + 1 ))" | grep "$ctrl: ")
    for q in $(seq 0 "$n"); do
        grep -q "qid $q send negotiate" <<<"$out" || fail "$ctrl: qid $q did not authenticate (no 'qid $q send negotiate' in dmesg)"
        grep -q "qid $q receive success1" <<<"$out" || fail "$ctrl: qid $q never got to Success1"
        [[ -z $step2 ]] || grep -q "qid $q send success2" <<<"$out" || fail "$ctrl: qid $q sent no Success2 (bidirectional)"
    done
    if grep -E 'send failure2|authentication failed|failed to receive|error [-0-9]+ setting up' <<<"$out"; then
        fail "$ctrl: an authentication failed: $(grep -m1 -E 'send failure2|authentication failed|failed to receive|error [-0-9]+ setting up' <<<"$out")"
    fi
}

# target_queues_authenticated QUEUES MIN: the target logged at least MIN successful
# authentications of each qid 1..QUEUES ("queue authenticated qid=N") since its last start.
target_queues_authenticated() {
    local q c
    for q in $(seq 1 "$1"); do
        c=$(auth_log_count "queue authenticated qid=$q hash=") || exit 1
        (( c >= $2 )) || fail "the target logged $c successful authentication(s) of qid $q, expected at least $2"
    done
}

ot_connect() { # ot_connect 1|2 [nvme-connect options]: connect as host 1 or 2; prints the device
    local i=$1; shift
    if [[ $i == 1 ]]; then auth_connect "$E2E_ADDR" "$E2E_AUTH_PORT" "$E2E_AUTH_NQN" "$OT_HOST1" "$OT_HOSTID1" "$@"
    else auth_connect "$E2E_ADDR" "$E2E_AUTH_PORT" "$E2E_AUTH_NQN" "$OT_HOST2" "$OT_HOSTID2" "$@"; fi
}
ot_refused() { # ot_refused 1|2 [nvme-connect options]
    local i=$1; shift
    if [[ $i == 1 ]]; then auth_connect_refused "$E2E_ADDR" "$E2E_AUTH_PORT" "$E2E_AUTH_NQN" "$OT_HOST1" "$OT_HOSTID1" "$@"
    else auth_connect_refused "$E2E_ADDR" "$E2E_AUTH_PORT" "$E2E_AUTH_NQN" "$OT_HOST2" "$OT_HOSTID2" "$@"; fi
}
ot_ctrl() { ctrls_of_host "$E2E_AUTH_NQN" "$1" | head -n1; }

# dd_check DEV OFFSET_MIB: 1 MiB of random data written (O_DIRECT) and read back equal.
dd_check() {
    x dd if=/dev/urandom of="$STATE/pattern" bs=1M count=1 status=none || fail "cannot make a pattern"
    x dd if="$STATE/pattern" of="/dev/$1" bs=1M seek="$2" oflag=direct conv=fsync status=none || fail "writing 1 MiB to /dev/$1 failed"
    x dd if="/dev/$1" of="$STATE/readback" bs=1M skip="$2" count=1 iflag=direct status=none || fail "reading 1 MiB from /dev/$1 failed"
    cmp -s "$STATE/pattern" "$STATE/readback" || fail "1 MiB written to /dev/$1 at $2 MiB reads back differently"
}

# The right secret (target's default hash and group), every queue (admin + 2 I/O) authenticates
# on both sides, I/O works.
sc_auth_connect() {
    need_auth_target
    auth_dyndbg
    local key dev ctrl mark res n
    key=$(dhchap_gen_key 0 32) || exit 1
    auth_target --host "$OT_HOST1" --require-auth --dhchap-secret "$key"
    mark=$(dmesg | wc -l)
    dev=$(ot_connect 1 --nr-io-queues 2 --dhchap-secret="$key") || exit 1
    ctrl=$(ot_ctrl "$OT_HOST1")
    res=$(auth_dmesg_result "$mark")
    log "$ctrl: ${res:-no 'authenticated' line}; /dev/$dev"
    [[ $res == "qid 0: authenticated with hash $OT_DEFAULT_HASH dhgroup $OT_DEFAULT_GROUP" ]] \
        || fail "expected 'qid 0: authenticated with hash $OT_DEFAULT_HASH dhgroup $OT_DEFAULT_GROUP' (the target's preference), got '${res:-nothing}'"
    n=$(dmesg | tail -n +"$(( mark + 1 ))" | grep -o "$ctrl: mapped [0-9/]* default/read/poll queues" | tail -n1)
    [[ $n == *"mapped 2/0/0 "* ]] || fail "expected 2 I/O queues, dmesg says '${n:-nothing}'"
    auth_queues_checked "$mark" "$ctrl" 2
    n=$(auth_log_count "host authenticated host=$OT_HOST1 subsystem=\"$E2E_AUTH_NQN\" hash=SHA-512 dhgroup=ffdhe3072 bidirectional=false") || exit 1
    (( n == 1 )) || fail "the target logged $n 'host authenticated' lines for this connect, expected 1"
    target_queues_authenticated 2 1
    [[ $(cat "/sys/class/nvme/$ctrl/dhchap_secret") == "$key" ]] || fail "/sys/class/nvme/$ctrl/dhchap_secret is not the secret connected with"
    (( $(blockdev --getsize64 "/dev/$dev") == E2E_AUTH_SIZE_BYTES )) || fail "/dev/$dev is not $E2E_AUTH_SIZE_BYTES bytes"
    fio_verify "$dev" 4k 8m
    disconnect_of "$E2E_AUTH_NQN"
}

# Bidirectional: the host also checks the controller (controller secret); secrets in the
# transformed forms (01-03) nvme-cli makes, the host's for the host NQN, the controller's for
# the subsystem NQN.
sc_auth_bidirectional() {
    need_auth_target
    auth_dyndbg
    local key ckey dev ctrl mark res
    key=$(dhchap_gen_key 2 48 "$OT_HOST1") || exit 1
    ckey=$(dhchap_gen_key 3 64 "$E2E_AUTH_NQN") || exit 1
    auth_target --host "$OT_HOST1" --require-auth --dhchap-secret "$key" --dhchap-ctrl-secret "$ckey"
    mark=$(dmesg | wc -l)
    dev=$(ot_connect 1 --nr-io-queues 2 --dhchap-secret="$key" --dhchap-ctrl-secret="$ckey") || exit 1
    ctrl=$(ot_ctrl "$OT_HOST1")
    res=$(auth_dmesg_result "$mark")
    [[ $res == "qid 0: authenticated with hash $OT_DEFAULT_HASH dhgroup $OT_DEFAULT_GROUP" ]] \
        || fail "expected 'qid 0: authenticated with hash $OT_DEFAULT_HASH dhgroup $OT_DEFAULT_GROUP', got '${res:-nothing}'"
    grep -q "$ctrl: qid 0: controller authenticated" <<<"$(dmesg_since "$mark")" \
        || fail "no '$ctrl: qid 0: controller authenticated' in dmesg"
    auth_queues_checked "$mark" "$ctrl" 2 success2
    res=$(auth_log_count "host authenticated host=$OT_HOST1 .*bidirectional=true") || exit 1
    (( res == 1 )) || fail "the target logged $res bidirectional 'host authenticated' lines, expected 1"
    res=$(auth_log_count "queue authenticated qid=[12] .*bidirectional=true") || exit 1
    (( res == 2 )) || fail "the target logged $res bidirectional I/O queue authentications, expected 2"
    [[ $(cat "/sys/class/nvme/$ctrl/dhchap_ctrl_secret") == "$ckey" ]] || fail "/sys/class/nvme/$ctrl/dhchap_ctrl_secret is not the controller secret"
    fio_verify "$dev" 4k 8m
    disconnect_of "$E2E_AUTH_NQN"
}

# A wrong host secret is refused by the target (AUTH_Failure1: EKEYREJECTED on the host), and so
# is a right one of the wrong length.
sc_auth_wrong_secret() {
    need_auth_target
    local key wrong wrong48 mark n
    key=$(dhchap_gen_key 0 32) || exit 1
    wrong=$(dhchap_gen_key 0 32) || exit 1
    wrong48=$(dhchap_gen_key 0 48) || exit 1
    auth_target --host "$OT_HOST1" --require-auth --dhchap-secret "$key"
    mark=$(dmesg | wc -l)
    ot_refused 1 --dhchap-secret="$wrong"
    grep -qE 'qid 0: authentication failed' <<<"$(dmesg_since "$mark")" \
        || fail "the host did not log 'qid 0: authentication failed' for a wrong secret"
    ot_refused 1 --dhchap-secret="$wrong48"
    n=$(auth_log_count "authentication failed.*host=$OT_HOST1") || exit 1
    (( n >= 2 )) || fail "the target logged $n 'authentication failed' lines for 2 wrong secrets"
    n=$(auth_log_count "host authenticated") || exit 1
    (( n == 0 )) || fail "the target logged $n successful authentications for wrong secrets"
    # The right one still gets in.
    ot_connect 1 --dhchap-secret="$key" > /dev/null || exit 1
    disconnect_of "$E2E_AUTH_NQN"
}

# An auth-required target refuses a host that sends no secret (the host gives up by itself:
# "qid 0: no key"), a controller secret alone, and a host for which it has no secret at all
# (whatever the host sends).
sc_auth_no_secret() {
    need_auth_target
    local key ckey other mark
    key=$(dhchap_gen_key 0 32) || exit 1
    ckey=$(dhchap_gen_key 0 32) || exit 1
    other=$(dhchap_gen_key 0 32) || exit 1
    auth_target --host "$OT_HOST1" --host "$OT_HOST2" --require-auth
    auth_ctl dhchap-secret "$OT_HOST1" "$key" "$ckey"
    mark=$(dmesg | wc -l)
    ot_refused 1
    grep -q 'qid 0: no key' <<<"$(dmesg_since "$mark")" || fail "the host did not log 'qid 0: no key'"
    ot_refused 1 --dhchap-ctrl-secret="$ckey"
    # Host 2 has no secret on the target.
    ot_refused 2
    ot_refused 2 --dhchap-secret="$other"
    local n
    n=$(auth_log_count "host authenticated") || exit 1
    (( n == 0 )) || fail "the target logged $n successful authentications"
}

# A target that does not require authentication lets a host without a secret in without
# authenticating, and one with a secret too when it has none for it; it still demands it of a
# host it has a secret for. require-auth and the secrets change at run time (control FIFO).
sc_auth_not_required() {
    need_auth_target
    local key other dev mark n
    key=$(dhchap_gen_key 0 32) || exit 1
    other=$(dhchap_gen_key 0 32) || exit 1
    auth_target --host "$OT_HOST1" --host "$OT_HOST2"
    auth_ctl dhchap-secret "$OT_HOST1" "$key"
    mark=$(dmesg | wc -l)
    dev=$(ot_connect 2) || exit 1
    dd_check "$dev" 8
    disconnect_of "$E2E_AUTH_NQN"
    ot_connect 2 --dhchap-secret="$other" > /dev/null || exit 1
    disconnect_of "$E2E_AUTH_NQN"
    dmesg | tail -n +"$(( mark + 1 ))" | grep -E 'authenticat|no key' \
        && fail "host 2 (no secret on the target) authenticated, or was asked to, on a target that does not require it"
    n=$(auth_log_count "authenticated|authentication failed") || exit 1
    (( n == 0 )) || fail "the target logged $n authentications of host 2"
    # Host 1 has a secret: it must authenticate.
    ot_refused 1
    ot_connect 1 --dhchap-secret="$key" > /dev/null || exit 1
    n=$(auth_log_count "host authenticated host=$OT_HOST1 subsystem=") || exit 1
    (( n == 1 )) || fail "the target logged $n authentications of host 1, expected 1"
    disconnect_of "$E2E_AUTH_NQN"
    # Now every host must (control FIFO), then again not.
    auth_ctl require-auth on
    ot_refused 2
    auth_ctl require-auth off
    ot_connect 2 > /dev/null || exit 1
    disconnect_of "$E2E_AUTH_NQN"
    # Host 1's secret dropped: it gets in without one.
    auth_ctl dhchap-remove "$OT_HOST1"
    mark=$(dmesg | wc -l)
    ot_connect 1 > /dev/null || exit 1
    dmesg | tail -n +"$(( mark + 1 ))" | grep -E 'authenticat|no key' && fail "host 1 authenticated after its secret was removed"
    disconnect_of "$E2E_AUTH_NQN"
}

# Rotation on a live controller while fio writes and verifies: connected bidirectionally, the
# target gets a new host secret (control FIFO), the host is given it through sysfs and
# re-authenticates every queue on the same controller; then the controller secret is rotated the
# same way. I/O runs throughout (fio randwrite + verify in a loop, every run must pass).
# Afterwards only the new secrets connect. (The host cannot add a controller secret to a
# controller connected without one: sysfs refuses it.)
FIO_LOOP_BS=4k
FIO_LOOP_SIZE=4m
sc_auth_rotate() {
    need_auth_target
    auth_dyndbg
    local old new oldc newc dev ctrl cntlid mark loop_pid runs n0 n1
    old=$(dhchap_gen_key 0 32) || exit 1
    new=$(dhchap_gen_key 1 32 "$OT_HOST1") || exit 1
    oldc=$(dhchap_gen_key 0 48) || exit 1
    newc=$(dhchap_gen_key 0 64) || exit 1
    auth_target --host "$OT_HOST1" --require-auth --dhchap-secret "$old" --dhchap-ctrl-secret "$oldc"
    dev=$(ot_connect 1 --nr-io-queues 2 --dhchap-secret="$old" --dhchap-ctrl-secret="$oldc") || exit 1
    ctrl=$(ot_ctrl "$OT_HOST1")
    cntlid=$(cat "/sys/class/nvme/$ctrl/cntlid")
    target_queues_authenticated 2 1
    # fio in a loop until told to stop: "start N" / "end N RC" lines in fio-loop.log.
    runs=$STATE/fio-loop.log
    rm -f "$runs" "$STATE/fio-loop.stop"
    (
        i=0
        while [[ ! -e $STATE/fio-loop.stop ]]; do
            i=$(( i + 1 ))
            echo "start $i $(now)" >> "$runs"
            timeout "$FIO_TIMEOUT" fio --name=rot --filename="/dev/$dev" --direct=1 --rw=randwrite --bs="$FIO_LOOP_BS" \
                --size="$FIO_LOOP_SIZE" --ioengine=libaio --iodepth=8 --verify=crc32c --do_verify=1 --verify_fatal=1 \
                > "$STATE/fio-loop.$i.out" 2>&1
            echo "end $i $? $(now)" >> "$runs"
        done
    ) &
    loop_pid=$!
    # shellcheck disable=SC2064 # the pid now
    trap "touch $STATE/fio-loop.stop; pkill -TERM -P $loop_pid; wait $loop_pid" EXIT
    # rotate_step WHAT SYSFS-ATTR VALUE: with a fio run in flight, write VALUE to the controller's
    # sysfs attribute; the controller re-authenticates bidirectionally (qid 0 and both I/O queues,
    # on both sides), stays the same and live, and the fio run in flight and the next one pass.
    rotate_step() {
        local what=$1 attr=$2 value=$3 inflight res i
        inflight=""
        for i in $(seq 1 150); do # until a fio run is in flight (30 s)
            inflight=$(awk '$1 == "start" {s = $2} $1 == "end" && $2 == s {s = ""} END {print s}' "$runs" 2>/dev/null)
            [[ -n $inflight ]] && break
            sleep 0.2
        done
        [[ -n $inflight ]] || fail "no fio run in flight to rotate under"
        n0=$(auth_log_count "queue authenticated qid=[12] hash=") || exit 1
        mark=$(dmesg | wc -l)
        echo "+ echo <$what> > /sys/class/nvme/$ctrl/$attr (fio run $inflight in flight)"
        echo "$value" > "/sys/class/nvme/$ctrl/$attr" || fail "writing the $what to /sys/class/nvme/$ctrl/$attr failed"
        res=""
        for i in $(seq 1 100); do # 20 s
            res=$(auth_dmesg_result "$mark")
            [[ -n $res ]] && break
            grep -q "$ctrl: qid 0: authentication failed" <<<"$(dmesg_since "$mark")" && break
            sleep 0.2
        done
        dmesg | tail -n +"$(( mark + 1 ))" | grep -iE 'nvme|auth' | grep -v 'nvme_auth_\|shared secret' 
        grep -q "$ctrl: re-authenticating controller" <<<"$(dmesg_since "$mark")" \
            || fail "no '$ctrl: re-authenticating controller' after writing $attr"
        [[ -n $res ]] || fail "$ctrl did not re-authenticate with the $what within 20s: $(dmesg | tail -n +"$(( mark + 1 ))" | grep -i "$ctrl" | grep -v 'nvme_auth\|shared secret' | tail -n 2 | tr '\n' ' ')"
        # The I/O queues re-authenticate after the admin queue (the host does not wait for them).
        for i in $(seq 1 100); do
            n1=$(auth_log_count "queue authenticated qid=[12] hash=") || exit 1
            (( n1 >= n0 + 2 )) && break
            sleep 0.2
        done
        (( n1 >= n0 + 2 )) || fail "the target logged $(( n1 - n0 )) I/O queue re-authentications within 20s, expected 2"
        auth_queues_checked "$mark" "$ctrl" 2 success2
        grep -q "$ctrl: qid 0: controller authenticated" <<<"$(dmesg_since "$mark")" \
            || fail "no '$ctrl: qid 0: controller authenticated' after writing $attr"
        [[ $(cat "/sys/class/nvme/$ctrl/cntlid") == "$cntlid" && $(cat "/sys/class/nvme/$ctrl/state") == live ]] \
            || fail "$ctrl changed during re-authentication: cntlid $(cat "/sys/class/nvme/$ctrl/cntlid" 2>/dev/null) (was $cntlid), state $(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null)"
        [[ $(cat "/sys/class/nvme/$ctrl/$attr") == "$value" ]] || fail "/sys/class/nvme/$ctrl/$attr is not the $what"
        local bad
        bad=$(dmesg | tail -n +"$(( mark + 1 ))" | grep -iE "$ctrl: .*(reset|reconnect|error recovery|timeout|I/O error)|blk_update_request" | head -n2)
        [[ -z $bad ]] || fail "the controller was reset or I/O failed during re-authentication: $(tr '\n' ' ' <<<"$bad")"
        # The run in flight and the next one (entirely after the re-authentication) pass.
        for i in $(seq 1 $(( FIO_TIMEOUT * 5 ))); do
            grep -q "^end $(( inflight + 1 )) " "$runs" && break
            grep -qE "^end [0-9]+ [1-9]" "$runs" && break
            sleep 0.2
        done
        if grep -E "^end [0-9]+ [1-9]" "$runs"; then
            local f
            f=$(grep -m1 -E "^end [0-9]+ [1-9]" "$runs" | cut -d' ' -f2)
            cat "$STATE/fio-loop.$f.out"
            fail "fio run $f failed across the $what rotation: $(grep -m1 -iE 'verify|bad|error|err=' "$STATE/fio-loop.$f.out" | cut -c1-200)"
        fi
        grep -q "^end $(( inflight + 1 )) 0 " "$runs" || fail "fio run $(( inflight + 1 )) did not finish"
        log "$what: $ctrl re-authenticated ($res), fio runs $inflight and $(( inflight + 1 )) passed"
    }
    auth_ctl dhchap-secret "$OT_HOST1" "$new" "$oldc"
    rotate_step "new host secret" dhchap_secret "$new"
    auth_ctl dhchap-secret "$OT_HOST1" "$new" "$newc"
    rotate_step "new controller secret" dhchap_ctrl_secret "$newc"
    touch "$STATE/fio-loop.stop"
    wait "$loop_pid"
    trap - EXIT
    grep -E "^end [0-9]+ [1-9]" "$runs" && fail "a fio run failed: $(grep -m1 -E "^end [0-9]+ [1-9]" "$runs")"
    info "fio-runs $(grep -c '^end ' "$runs") (${FIO_LOOP_BS} x ${FIO_LOOP_SIZE} randwrite+verify each), all passed across 2 re-authentications"
    disconnect_of "$E2E_AUTH_NQN"
    ot_refused 1 --dhchap-secret="$old" --dhchap-ctrl-secret="$newc"
    ot_refused 1 --dhchap-secret="$new" --dhchap-ctrl-secret="$oldc"
    ot_connect 1 --dhchap-secret="$new" --dhchap-ctrl-secret="$newc" > /dev/null || exit 1
    disconnect_of "$E2E_AUTH_NQN"
}

# The host refuses the controller (wrong controller secret): it sends AUTH_Failure2, which the
# target must complete before it closes the queue; the connect then fails at once, without the
# host waiting for its admin timeout (nvme_core admin_timeout, 60 s, left as it is). Three times.
sc_auth_wrong_ctrl_secret() {
    need_auth_target
    local key ckey wrong mark i t0 times="" n
    key=$(dhchap_gen_key 0 32) || exit 1
    ckey=$(dhchap_gen_key 0 32) || exit 1
    wrong=$(dhchap_gen_key 0 32) || exit 1
    auth_target --host "$OT_HOST1" --require-auth --dhchap-secret "$key" --dhchap-ctrl-secret "$ckey"
    log "admin_timeout $(cat "$ADMIN_TIMEOUT_PARAM")s"
    for i in 1 2 3; do
        mark=$(dmesg | wc -l)
        t0=$(now)
        ot_refused 1 --dhchap-secret="$key" --dhchap-ctrl-secret="$wrong"
        times+="$(secs_since "$t0")s "
        grep -q 'qid 0: controller authentication failed' <<<"$(dmesg_since "$mark")" \
            || fail "attempt $i: the host did not log 'qid 0: controller authentication failed'"
        # A target that closed the queue without completing the Failure2 command: the host times it
        # out (admin timeout), or finds the connection gone when it sends.
        if dmesg | tail -n +"$(( mark + 1 ))" | grep -iE 'timeout|timed out|failed to send request'; then
            fail "attempt $i: $(dmesg | tail -n +"$(( mark + 1 ))" | grep -m1 -iE 'timeout|timed out|failed to send request')"
        fi
    done
    n=$(auth_log_count "host ended authentication \(AUTH_Failure2\).*host=$OT_HOST1") || exit 1
    (( n == 3 )) || fail "the target logged $n AUTH_Failure2 from the host, expected 3"
    info "refused-in ${times% }"
    # The right controller secret works.
    ot_connect 1 --dhchap-secret="$key" --dhchap-ctrl-secret="$ckey" > /dev/null || exit 1
    disconnect_of "$E2E_AUTH_NQN"
}

# Every hash x DH group, forced on the target (--dhchap-hashes/--dhchap-dhgroups with one each;
# the host offers all): the host logs exactly that pair, the target too, and I/O works. The
# secret changes with every pair, through the six forms nvme-cli makes (00 with 32/48/64 bytes,
# 01/02/03 transformed). Then a preference list: the target's first choice the host offers wins.
sc_auth_matrix() {
    need_auth_target
    local forms=("0 32" "0 48" "0 64" "1 32" "2 48" "3 64") keys=() f hash h group i=0 key mark res n t0 times=""
    for f in "${forms[@]}"; do
        # shellcheck disable=SC2086 # "HMAC LEN"
        keys+=("$(dhchap_gen_key $f "$OT_HOST1")") || exit 1
    done
    for hash in "${AUTH_HASHES[@]}"; do
        h=${hash#hmac(}; h=${h%)}
        for group in "${AUTH_DHGROUPS[@]}"; do
            key=${keys[i % ${#keys[@]}]}
            i=$(( i + 1 ))
            auth_target --host "$OT_HOST1" --require-auth --dhchap-secret "$key" --dhchap-hashes "$h" --dhchap-dhgroups "$group"
            mark=$(dmesg | wc -l)
            t0=$(now)
            # KATO 15 s: the target's keep-alive timer runs from the Connect on, also while the
            # admin queue authenticates, and under TCG on a busy machine the guest's own ffdhe8192
            # computations took up to 2.2 s per queue (real hosts: milliseconds).
            dev=$(ot_connect 1 --nr-io-queues 1 --keep-alive-tmo=15 --dhchap-secret="$key") || exit 1
            times+="$h/$group=$(secs_since "$t0")s "
            res=$(auth_dmesg_result "$mark")
            [[ $res == "qid 0: authenticated with hash $hash dhgroup $group" ]] \
                || fail "target forced to $h/$group (secret ${key:0:10}...): the host logged '${res:-nothing}'"
            n=$(auth_log_count "host authenticated host=$OT_HOST1 subsystem=\"$E2E_AUTH_NQN\" hash=SHA-${h#sha} dhgroup=$group bidirectional=") || exit 1
            (( n == 1 )) || fail "target forced to $h/$group: it logged $n matching 'host authenticated' lines"
            target_queues_authenticated 1 1
            dd_check "$dev" $(( i % 32 ))
            disconnect_of "$E2E_AUTH_NQN"
        done
    done
    info "connect-seconds ${times% }"
    auth_target --host "$OT_HOST1" --require-auth --dhchap-secret "${keys[0]}" --dhchap-hashes sha384,sha512 --dhchap-dhgroups ffdhe4096,ffdhe2048
    mark=$(dmesg | wc -l)
    ot_connect 1 --dhchap-secret="${keys[0]}" > /dev/null || exit 1
    res=$(auth_dmesg_result "$mark")
    [[ $res == "qid 0: authenticated with hash hmac(sha384) dhgroup ffdhe4096" ]] \
        || fail "target preferring sha384,sha512 and ffdhe4096,ffdhe2048: the host logged '${res:-nothing}'"
    disconnect_of "$E2E_AUTH_NQN"
}

# ---------------------------------------------------------------------------------------
# driver

SCENARIOS=(
    discover:sc_discover
    connect:sc_connect
    fio-verify-4k:sc_fio_verify_4k
    fio-verify-128k:sc_fio_verify_128k
    xfs-mount-checksum:sc_xfs
    reconnect-persistence:sc_reconnect_persistence
    digests:sc_digests
    host-denied:sc_host_denied
    discard:sc_discard
    resize:sc_resize
    control-discover:sc_control_discover
    control-connect:sc_control_connect
    control-fio-verify-4k:sc_control_fio_verify_4k
    control-disconnect:sc_control_disconnect
    # Kernels with NVMe authentication only (not 6.1), see below.
    control-auth-keys:sc_control_auth_keys
    control-auth-connect:sc_control_auth_connect
    control-auth-matrix:sc_control_auth_matrix
    control-auth-bidirectional:sc_control_auth_bidirectional
    control-auth-wrong-secret:sc_control_auth_wrong_secret
    control-auth-no-secret:sc_control_auth_no_secret
    control-auth-not-required:sc_control_auth_not_required
    control-auth-rotate:sc_control_auth_rotate
    auth-connect:sc_auth_connect
    auth-bidirectional:sc_auth_bidirectional
    auth-wrong-secret:sc_auth_wrong_secret
    auth-no-secret:sc_auth_no_secret
    auth-not-required:sc_auth_not_required
    auth-wrong-ctrl-secret:sc_auth_wrong_ctrl_secret
    auth-rotate:sc_auth_rotate
    auth-matrix:sc_auth_matrix
    postgres:sc_postgres
    # Last: it takes the network down for a while.
    keepalive-expiry:sc_keepalive_expiry
)

# Debian 12's 6.1 kernel has no NVMe authentication (CONFIG_NVME_AUTH unset): on it the
# control-auth-* and auth-* scenarios are not planned, unless named in E2E_ONLY (then they fail and say so).
selected=()
for s in "${SCENARIOS[@]}"; do
    name=${s%%:*}
    if [[ -n ${E2E_ONLY:-} ]]; then
        [[ " $E2E_ONLY " == *" $name "* ]] && selected+=("$s")
    elif [[ ( $name != control-auth-* && $name != auth-* ) || ${E2E_KERNEL:-6.1} != 6.1 ]]; then
        selected+=("$s")
    fi
done
[[ ${E2E_KERNEL:-6.1} != 6.1 || -n ${E2E_ONLY:-} ]] \
    || log "kernel 6.1 (no NVMe authentication): the control-auth-* and auth-* scenarios are not planned (run.sh --kernel 6.12)"
echo "PLAN ${selected[*]%%:*}" > "$RESULTS"
log "plan: ${selected[*]%%:*}"

# e2e-include: lib/run.sh
run_selected

log "cleanup"
mountpoint -q "$MNT" && umount "$MNT"
[[ -e /dev/nvme-fabrics ]] && timeout 60 nvme disconnect-all
( nvmet_teardown )
( nvmet_auth_teardown )
log "controllers left: $(ls /sys/class/nvme 2>/dev/null | tr '\n' ' ')"
echo "===== guest dmesg | grep -i nvme ====="
dmesg | grep -i nvme
echo "===== end of guest dmesg ====="
exit "$failed"
