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
