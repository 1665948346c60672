# Helpers for the ZFS suites (included by run.sh through '# e2e-include: lib/zfs.sh'; use the
# including script's x/fail helpers and its ARC_MAX and POOL variables).

# udev makes /dev/zvol/POOL/VOL (60-zvol.rules, zvol_id) and the disk links zpool create
# waits for. Only block devices are triggered (no network interface renaming).
udev_setup() {
    pgrep -x systemd-udevd > /dev/null && return 0
    x /lib/systemd/systemd-udevd --daemon || fail "cannot start systemd-udevd"
    x udevadm trigger --action=add --subsystem-match=block
    x timeout 120 udevadm settle || fail "udevadm settle timed out"
}

zfs_module() {
    [[ -e /dev/zfs ]] && return 0
    udev_setup
    x modprobe zfs zfs_arc_max="$ARC_MAX" || fail "modprobe zfs failed: $(dmesg | grep -iE 'zfs|spl' | tail -n 2 | tr '\n' ' ')"
    local i
    for i in $(seq 1 50); do [[ -e /dev/zfs ]] && return 0; sleep 0.2; done
    fail "/dev/zfs did not appear after modprobe zfs"
}

# pool_create: the pool POOL on the run's scratch disk (whole disk: zpool partitions it), once.
pool_create() {
    zfs_module
    zpool list -H "$POOL" > /dev/null 2>&1 && return 0
    [[ -n ${E2E_SCRATCH_DEV:-} && -b ${E2E_SCRATCH_DEV:-} ]] \
        || fail "no scratch disk (E2E_SCRATCH_DEV='${E2E_SCRATCH_DEV:-}'): run through run.sh, which attaches it"
    x timeout 120 zpool create -f -o ashift=12 -O mountpoint=none -O compression=off "$POOL" "$E2E_SCRATCH_DEV" \
        || fail "zpool create $POOL $E2E_SCRATCH_DEV failed (rc=$?)"
    x udevadm settle -t 60
}

# zfs_num PROPERTY DATASET: a property as a plain number (bytes; compressratio without the x).
zfs_num() { zfs get -Hp -o value "$1" "$2" | sed 's/x$//'; }
# Everything freed or written so far is in the pool's accounting.
pool_sync() { sync; x zpool sync "$POOL" || fail "zpool sync failed"; }
