#!/bin/bash
# NVMe/TCP end-to-end scenarios, run INSIDE the guest by /sbin/xe2e-init.
#
# Input (environment, from the fw_cfg env file written by run.sh):
#   E2E_ADDR E2E_PORT   where the target listens, as seen from the guest (10.0.2.2:PORT)
#   E2E_NQN             subsystem NQN served by the target
#   E2E_SERIAL          serial number the target reports
#   E2E_SIZE_BYTES      namespace size; E2E_BLOCK_SIZE its logical block size
#   E2E_HOSTNQN E2E_HOSTID            the host identity the target allows
#   E2E_BAD_HOSTNQN E2E_BAD_HOSTID    a host identity the target must refuse
#   E2E_ONLY            optional space-separated list of scenario names to run
#
# Output: one line per scenario on /dev/ttyS1 ("PASS <name>" / "FAIL <name>: <reason>"),
# preceded by "PLAN <names...>"; everything else (command traces, tool output, dmesg)
# goes to stdout = the serial console.
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

: "${E2E_ADDR:?}" "${E2E_PORT:?}" "${E2E_NQN:?}" "${E2E_SERIAL:?}" "${E2E_SIZE_BYTES:?}"
: "${E2E_BLOCK_SIZE:?}" "${E2E_HOSTNQN:?}" "${E2E_HOSTID:?}" "${E2E_BAD_HOSTNQN:?}" "${E2E_BAD_HOSTID:?}"

# The host identity nvme-cli uses by default, so even commands without --hostnqn agree.
mkdir -p /etc/nvme
echo "$E2E_HOSTNQN" > /etc/nvme/hostnqn
echo "$E2E_HOSTID" > /etc/nvme/hostid

now() { cut -d' ' -f1 /proc/uptime; }
log() { echo "--- [$(now)s] $*"; }
# Run a command, echoing it first; its output goes to the console.
x() { echo "+ $*"; "$@"; }
# Record why the current scenario fails (first reason wins) and leave it.
fail() { [[ -e $STATE/reason ]] || echo "$*" > "$STATE/reason"; exit 1; }

# ---------------------------------------------------------------------------------------
# helpers

# Block device (name, e.g. nvme0n1) of namespace 1 of our subsystem, if connected.
ns_dev() {
    local b nqn
    for b in /sys/block/nvme*; do
        [[ -e $b ]] || continue
        b=${b##*/}
        [[ $b =~ ^nvme[0-9]+n[0-9]+$ ]] || continue # skip hidden multipath paths nvmeXcYnZ
        nqn=$(cat "/sys/block/$b/device/subsysnqn" 2>/dev/null) || continue
        [[ $nqn == "$E2E_NQN" ]] || continue
        [[ -b /dev/$b ]] || continue
        echo "$b"
        return 0
    done
    return 1
}

# Controllers (nvmeX) connected to our subsystem (any host NQN), one per line.
our_ctrls() {
    local c
    for c in /sys/class/nvme/nvme*; do
        [[ -e $c ]] || continue
        [[ $(cat "$c/subsysnqn" 2>/dev/null) == "$E2E_NQN" ]] && echo "${c##*/}"
    done
    return 0
}

wait_for_dev() {
    local i d
    for i in $(seq 1 150); do # 30 s
        if d=$(ns_dev); then echo "$d"; return 0; fi
        sleep 0.2
    done
    return 1
}

wait_for_no_ctrl() {
    local i
    for i in $(seq 1 150); do
        [[ -z $(our_ctrls) ]] && return 0
        sleep 0.2
    done
    return 1
}

# Scenarios can run alone (E2E_ONLY), so every connecting path loads the initiator itself.
need_nvme_tcp() {
    [[ -e /dev/nvme-fabrics && -d /sys/module/nvme_tcp ]] && return 0
    modprobe nvme-tcp >&2 || fail "modprobe nvme-tcp failed"
}

# connect [extra nvme-connect options...]: connect with the allowed host identity,
# wait for the namespace block device; prints its name.
connect() {
    need_nvme_tcp
    x timeout 60 nvme connect -t tcp -a "$E2E_ADDR" -s "$E2E_PORT" -n "$E2E_NQN" \
        --hostnqn "$E2E_HOSTNQN" --hostid "$E2E_HOSTID" "${CONNECT_OPTS[@]}" "$@" >&2 \
        || fail "nvme connect $* failed (rc=$?)"
    local d
    d=$(wait_for_dev) || fail "namespace block device did not appear within 30s after nvme connect $*"
    echo "$d"
}

disconnect() {
    mountpoint -q "$MNT" && umount "$MNT"
    if [[ -n $(our_ctrls) ]]; then
        x timeout 60 nvme disconnect -n "$E2E_NQN" || fail "nvme disconnect -n $E2E_NQN failed (rc=$?)"
    fi
    wait_for_no_ctrl || fail "controller still present 30s after nvme disconnect: $(our_ctrls | tr '\n' ' ')"
}

# Connected with default options (reusing an existing connection).
ensure_connected() {
    local d
    if d=$(ns_dev); then echo "$d"; else connect; fi
}

dmesg_mark() { dmesg | wc -l > "$STATE/dmesg.mark"; }
dmesg_since_mark() { dmesg | tail -n +"$(( $(cat "$STATE/dmesg.mark") + 1 ))"; }

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
    x timeout 60 nvme discover -t tcp -a "$E2E_ADDR" -s "$E2E_PORT" \
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
    [[ $nvm_nqns == "$E2E_NQN" ]] || fail "discovery log lists NVM subsystems [$(echo $nvm_nqns)], expected exactly [$E2E_NQN]"
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
    if dmesg_since_mark | grep -i nvme | grep -iE 'digest|error|fail'; then
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
)

selected=()
for s in "${SCENARIOS[@]}"; do
    name=${s%%:*}
    if [[ -z ${E2E_ONLY:-} || " $E2E_ONLY " == *" $name "* ]]; then selected+=("$s"); fi
done
echo "PLAN ${selected[*]%%:*}" > "$RESULTS"
log "plan: ${selected[*]%%:*}"

failed=0
for s in "${selected[@]}"; do
    name=${s%%:*} fn=${s#*:}
    rm -f "$STATE/reason"
    log "BEGIN $name"
    t0=$(date +%s)
    ( "$fn" )
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    if [[ $rc == 0 ]]; then
        log "END $name: PASS (${dt}s)"
        echo "PASS $name" > "$RESULTS"
    else
        reason=$(cat "$STATE/reason" 2>/dev/null || echo "exited rc=$rc")
        log "END $name: FAIL (${dt}s): $reason"
        echo "FAIL $name: $reason" > "$RESULTS"
        failed=$(( failed + 1 ))
    fi
    echo "TIME $name ${dt}s" > "$RESULTS"
done

log "cleanup"
mountpoint -q "$MNT" && umount "$MNT"
[[ -e /dev/nvme-fabrics ]] && timeout 60 nvme disconnect-all
log "controllers left: $(ls /sys/class/nvme 2>/dev/null | tr '\n' ' ')"
echo "===== guest dmesg | grep -i nvme ====="
dmesg | grep -i nvme
echo "===== end of guest dmesg ====="
exit "$failed"
