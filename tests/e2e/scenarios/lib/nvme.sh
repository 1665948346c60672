# Helpers for scenarios that use the Linux NVMe/TCP initiator (included by run.sh through
# '# e2e-include: lib/nvme.sh'; uses the including script's x/fail helpers).

# Scenarios can run alone (E2E_ONLY), so every connecting path loads the initiator itself.
need_nvme_tcp() {
    [[ -e /dev/nvme-fabrics && -d /sys/module/nvme_tcp ]] && return 0
    modprobe nvme-tcp >&2 || fail "modprobe nvme-tcp failed"
}

# Block device (name, e.g. nvme0n1) of the first namespace of subsystem $1, if connected.
ns_dev_of() {
    local b nqn
    for b in /sys/block/nvme*; do
        [[ -e $b ]] || continue
        b=${b##*/}
        [[ $b =~ ^nvme[0-9]+n[0-9]+$ ]] || continue # skip hidden multipath paths nvmeXcYnZ
        nqn=$(cat "/sys/block/$b/device/subsysnqn" 2>/dev/null) || continue
        [[ $nqn == "$1" ]] || continue
        [[ -b /dev/$b ]] || continue
        echo "$b"
        return 0
    done
    return 1
}

# Controllers (nvmeX) connected to subsystem $1 (any host NQN), one per line.
ctrls_of() {
    local c
    for c in /sys/class/nvme/nvme*; do
        [[ -e $c ]] || continue
        [[ $(cat "$c/subsysnqn" 2>/dev/null) == "$1" ]] && echo "${c##*/}"
    done
    return 0
}

# fio_verify DEV BS SIZE: random writes + crc32c verify on /dev/DEV, direct (uses FIO_TIMEOUT).
fio_verify() {
    local dev=$1 bs=$2 size=$3 rc
    x timeout "$FIO_TIMEOUT" fio --name=v --filename="/dev/$dev" --direct=1 --rw=randwrite \
        --bs="$bs" --size="$size" --ioengine=libaio --iodepth=8 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 > "$STATE/fio.out" 2>&1
    rc=$?
    cat "$STATE/fio.out"
    [[ $rc == 0 ]] || fail "fio bs=$bs size=$size randwrite+verify failed (rc=$rc): $(grep -m1 -iE 'verify|bad|error|err=' "$STATE/fio.out" | cut -c1-200)"
    grep -q 'err= 0' "$STATE/fio.out" || fail "fio bs=$bs size=$size: no 'err= 0' in fio's report"
}

# sha256 of LEN MiB at OFFSET MiB of a device, read with O_DIRECT: dev_sum DEV OFFSET_MIB LEN_MIB
dev_sum() { dd if="$1" bs=1M skip="$2" count="$3" iflag=direct status=none | sha256sum | cut -d' ' -f1; }
