#!/bin/bash
# Build (or reuse) the Debian bookworm guest image for the NVMe/TCP end-to-end tests.
#
# Usage: tests/e2e/build-image.sh [--force]
#
# The image is cached outside the repository, in
#   ${XATASTOR_E2E_CACHE:-/var/cache/xatastor-e2e}/<key>/
# where <key> is a hash of this script and of guest/init.sh (the guest's PID 1,
# baked into the image), so editing either one (e.g. the package list) builds a
# new image. The directory holds:
#   vmlinuz      the guest kernel (Debian linux-image-amd64)
#   initrd.img   the Debian initramfs (loads virtio_blk + ext4, mounts /dev/vda)
#   rootfs.img   raw ext4 image of the debootstrap'd root filesystem
#                (boot it read-only / with snapshot=on: it is shared by every run)
#   manifest.txt kernel version, ZFS version, package versions, build time
#
# ZFS: zfs-dkms and zfsutils-linux come from Debian's contrib component. The module is built by
# dkms inside the chroot for the guest kernel (linux-headers-<guest kernel>, never `uname -r`,
# which is the host's), then the build toolchain and headers are purged again; the built
# zfs.ko/spl.ko stay in /lib/modules/<guest kernel>/updates/dkms (depmod'ed). The initramfs does
# not contain ZFS (the root file system is ext4).
#
# XATASTOR_E2E_KEEP_BUILD=1 keeps the half-built tree after a failure (debugging).
# Progress goes to stderr; the image directory is printed on stdout (last line).
# Needs root, debootstrap, mke2fs (>= 1.43 for -d) and access to a Debian mirror
# (XATASTOR_E2E_MIRROR, default http://deb.debian.org/debian).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${XATASTOR_E2E_CACHE:-/var/cache/xatastor-e2e}"
MIRROR="${XATASTOR_E2E_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
# Packages installed in the guest (besides debootstrap's minbase set).
PACKAGES=(
    linux-image-amd64 initramfs-tools zstd
    kmod nvme-cli fio xfsprogs util-linux e2fsprogs iproute2 procps
    # The postgres scenario: server (initdb, pg_ctl, postgres) and client (psql, pgbench).
    # debootstrap installs Depends only, never Recommends.
    postgresql-15 postgresql-client-15
)
# PostgreSQL binaries the postgres scenario runs directly (there is no systemd in the guest).
PG_BINDIR=/usr/lib/postgresql/15/bin
# ZFS (Debian contrib), installed with apt-get after debootstrap (see install_zfs below). dkms
# pulls in the compiler; it and the kernel headers are purged once the module is built.
ZFS_PACKAGES=(zfs-dkms zfsutils-linux)
# Modules the initramfs must contain to mount the root disk.
INITRD_MODULES=(virtio_pci virtio_blk ext4 crc32c_generic)

FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "build-image.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { printf '[build-image %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

KEY="$(cat "$HERE/build-image.sh" "$HERE/guest/init.sh" | sha256sum | cut -c1-16)"
OUT="$CACHE/$KEY"

if [[ $FORCE == 0 && -f "$OUT/.complete" ]]; then
    log "reusing cached image $OUT"
    echo "$OUT"
    exit 0
fi

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot)"
for tool in debootstrap mke2fs chroot sha256sum flock; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (apt-get install debootstrap e2fsprogs util-linux)"
done
mkdir -p "$CACHE" || die "cannot create cache directory $CACHE"

# One builder at a time per cache directory.
exec 9>"$CACHE/.lock"
flock 9
if [[ $FORCE == 0 && -f "$OUT/.complete" ]]; then
    log "image was built by a concurrent run: $OUT"
    echo "$OUT"
    exit 0
fi

T0=$(date +%s)
WORK="$CACHE/.build-$KEY.$$"
ROOT="$WORK/root"
cleanup() {
    local rc=$?
    # Never leave mounts behind inside the chroot.
    for m in "$ROOT/proc" "$ROOT/sys" "$ROOT/dev"; do
        mountpoint -q "$m" 2>/dev/null && umount -l "$m" || true
    done
    if [[ $rc != 0 && -n ${XATASTOR_E2E_KEEP_BUILD:-} ]]; then
        log "FAILED (exit $rc); build directory kept: $WORK"
    elif [[ -d "$WORK" ]]; then
        rm -rf --one-file-system "$WORK"
        if [[ $rc != 0 ]]; then log "FAILED (exit $rc)"; fi
    fi
}
trap cleanup EXIT
rm -rf --one-file-system "$CACHE"/.build-"$KEY".* 2>/dev/null || true
mkdir -p "$ROOT"

log "debootstrap $SUITE (minbase + ${PACKAGES[*]}) from $MIRROR into $ROOT"
INCLUDE="$(IFS=,; echo "${PACKAGES[*]}")"
if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOT" "$MIRROR" \
        > "$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    [[ -f "$ROOT/debootstrap/debootstrap.log" ]] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (see above)"
fi
log "debootstrap done ($(( $(date +%s) - T0 ))s)"

KVERS=("$ROOT"/lib/modules/*)
[[ ${#KVERS[@]} == 1 && -d ${KVERS[0]} ]] || die "expected exactly one kernel in $ROOT/lib/modules, found: ${KVERS[*]}"
KVER="$(basename "${KVERS[0]}")"
[[ -f "$ROOT/boot/vmlinuz-$KVER" ]] || die "kernel image $ROOT/boot/vmlinuz-$KVER missing"
for m in nvme-tcp nvme-fabrics nvme-core xfs virtio_net qemu_fw_cfg; do
    [[ -n "$(find "$ROOT/lib/modules/$KVER" -name "${m//-/[-_]}.ko*")" ]] \
        || grep -qw "${m//-/_}" "$ROOT/lib/modules/$KVER/modules.builtin" \
        || die "kernel $KVER has no module $m"
done

for b in initdb pg_ctl postgres pg_controldata psql pgbench; do
    [[ -x "$ROOT$PG_BINDIR/$b" ]] || die "PostgreSQL binary $PG_BINDIR/$b missing"
done
grep -q '^postgres:' "$ROOT/etc/passwd" || die "no postgres user in the guest"

# --- ZFS ------------------------------------------------------------------------------------
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
# Run apt-get/dpkg in the chroot non-interactively; no service may start in it.
capt() {
    chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
        apt-get -y -q -o Dpkg::Use-Pty=0 -o APT::Install-Recommends=false "$@"
}
cchroot() { chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
install_zfs() {
    local t0 log_ zver zpkgver resolv=0
    t0=$(date +%s)
    log_="$WORK/zfs.log"
    # apt-get in the chroot resolves the mirror's name with the host's resolver.
    if [[ ! -s $ROOT/etc/resolv.conf ]]; then
        rm -f "$ROOT/etc/resolv.conf"
        cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
        resolv=1
    fi
    printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
    chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
    echo "deb $MIRROR $SUITE main contrib" > "$ROOT/etc/apt/sources.list"
    log "ZFS: apt-get update ($SUITE main contrib)"
    capt update > "$log_" 2>&1 || { tail -n 20 "$log_" >&2; die "apt-get update in the chroot failed"; }
    # Headers of exactly the guest kernel, first: zfs-dkms's postinst then finds a kernel to
    # build for. `uname -r` in the chroot is the host kernel, whose headers are absent, so
    # dkms skips it ("belongs to a chroot's host"); the explicit build below does not rely on
    # the postinst either way.
    log "ZFS: installing linux-headers-$KVER"
    capt install "linux-headers-$KVER" >> "$log_" 2>&1 \
        || { tail -n 20 "$log_" >&2; die "apt-get install linux-headers-$KVER failed"; }
    log "ZFS: installing ${ZFS_PACKAGES[*]} (zfs-dkms's postinst compiles the module: minutes)"
    if ! capt install "${ZFS_PACKAGES[@]}" >> "$log_" 2>&1; then
        tail -n 20 "$log_" >&2
        log "ZFS: apt-get install reported an error (see above); building explicitly for $KVER"
    fi
    zpkgver=$(cchroot dpkg-query -W -f='${Version}' zfs-dkms) || die "zfs-dkms is not installed"
    zver=${zpkgver%%-*}
    [[ -d $ROOT/usr/src/zfs-$zver ]] || die "no dkms source tree /usr/src/zfs-$zver (zfs-dkms $zpkgver)"
    if ! ls "$ROOT/lib/modules/$KVER/updates/dkms/"zfs.ko* > /dev/null 2>&1; then
        log "ZFS: dkms install zfs/$zver -k $KVER"
        cchroot dkms install "zfs/$zver" -k "$KVER" >> "$log_" 2>&1 \
            || { tail -n 40 "$log_" >&2; die "dkms install zfs/$zver -k $KVER failed"; }
    fi
    # Finish any configuration the postinst could not do.
    cchroot dpkg --configure -a >> "$log_" 2>&1 || { tail -n 20 "$log_" >&2; die "dpkg --configure -a failed"; }
    cchroot dkms status >> "$log_" 2>&1 || true
    for m in zfs spl; do
        ls "$ROOT/lib/modules/$KVER/updates/dkms/$m.ko"* > /dev/null 2>&1 \
            || die "$m.ko missing from /lib/modules/$KVER/updates/dkms after the dkms build (see $log_)"
    done
    for b in /sbin/zpool /sbin/zfs /usr/lib/udev/zvol_id /usr/lib/udev/rules.d/60-zvol.rules /lib/systemd/systemd-udevd /bin/udevadm; do
        # In the chroot: some are absolute symlinks (systemd-udevd -> /bin/udevadm).
        cchroot test -e "$b" || die "$b missing in the guest (zfsutils-linux / udev)"
    done
    log "ZFS: module $zver built for $KVER ($(( $(date +%s) - t0 ))s)"

    # Purge the toolchain and headers, keeping the built modules: purging zfs-dkms runs
    # `dkms remove`, so save them first and put them back. Autoremove must not keep what is
    # merely suggested/recommended (apt suggests dpkg-dev, which recommends gcc), or gcc stays.
    local noweak=(-o APT::AutoRemove::SuggestsImportant=false -o APT::AutoRemove::RecommendsImportant=false)
    if capt "${noweak[@]}" -s purge --autoremove zfs-dkms dkms "linux-headers-$KVER" 2>/dev/null | grep -q '^Purg zfsutils-linux '; then
        log "ZFS: purging zfs-dkms would remove zfsutils-linux; keeping the toolchain"
    else
        log "ZFS: purging the compiler, dkms and kernel headers (the built modules are kept)"
        mkdir -p "$WORK/zfs-modules"
        cp -a "$ROOT/lib/modules/$KVER/updates/dkms/." "$WORK/zfs-modules/"
        capt "${noweak[@]}" purge --autoremove zfs-dkms dkms "linux-headers-$KVER" >> "$log_" 2>&1 \
            || { tail -n 20 "$log_" >&2; die "apt-get purge of the build toolchain failed"; }
        mkdir -p "$ROOT/lib/modules/$KVER/updates/dkms"
        cp -a "$WORK/zfs-modules/." "$ROOT/lib/modules/$KVER/updates/dkms/"
        rm -rf "$ROOT"/usr/src/zfs-* "$ROOT/var/lib/dkms"
        [[ $(cchroot dpkg-query -W -f='${Status}' zfsutils-linux 2>/dev/null) == "install ok installed" ]] \
            || die "zfsutils-linux was removed by the purge"
        for p in gcc-12 make dpkg-dev; do
            [[ $(cchroot dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]] \
                || log "ZFS: note: $p is still installed after the purge"
        done
    fi
    cchroot depmod "$KVER" || die "depmod $KVER failed"
    cchroot modinfo -k "$KVER" zfs > "$WORK/zfs-modinfo.txt" 2>&1 || die "modinfo -k $KVER zfs failed"
    grep -q "^filename: */lib/modules/$KVER/updates/dkms/zfs.ko" "$WORK/zfs-modinfo.txt" \
        || die "modinfo -k $KVER zfs does not find updates/dkms/zfs.ko: $(head -n1 "$WORK/zfs-modinfo.txt")"
    ZFS_MANIFEST="zfs: $zpkgver (zfs-dkms + zfsutils-linux $(cchroot dpkg-query -W -f='${Version}' zfsutils-linux), $SUITE contrib)"
    ZFS_MANIFEST+=$'\n'"zfs-module: $(sed -n 's/^version: *//p' "$WORK/zfs-modinfo.txt") for $KVER in /lib/modules/$KVER/updates/dkms ($(cd "$ROOT/lib/modules/$KVER/updates/dkms" && ls | tr '\n' ' '))"
    ZFS_MANIFEST+=$'\n'"zfs-build-seconds: $(( $(date +%s) - t0 ))"
    rm -f "$ROOT/usr/sbin/policy-rc.d"
    capt clean > /dev/null 2>&1 || true
    [[ $resolv == 0 ]] || rm -f "$ROOT/etc/resolv.conf"
}
ZFS_MANIFEST=""
install_zfs

log "configuring guest (init, hostname, nvme)"
install -m 0755 "$HERE/guest/init.sh" "$ROOT/sbin/xe2e-init"
echo xe2e-guest > "$ROOT/etc/hostname"
echo "127.0.0.1 localhost xe2e-guest" > "$ROOT/etc/hosts"
: > "$ROOT/etc/fstab"
mkdir -p "$ROOT/etc/nvme"
# Small, deterministic initramfs: only what is needed to mount /dev/vda.
mkdir -p "$ROOT/etc/initramfs-tools/conf.d"
cat > "$ROOT/etc/initramfs-tools/conf.d/xe2e.conf" <<EOF
MODULES=list
COMPRESS=zstd
EOF
printf '%s\n' "${INITRD_MODULES[@]}" > "$ROOT/etc/initramfs-tools/modules"

log "regenerating initramfs for $KVER"
if ! chroot "$ROOT" update-initramfs -c -k "$KVER" > "$WORK/initramfs.log" 2>&1; then
    cat "$WORK/initramfs.log" >&2
    die "update-initramfs failed"
fi
# postgresql-common's postinst created the packaged cluster 15/main (never started: debootstrap
# installs a policy-rc.d that denies it). The scenario makes its own cluster on the NVMe
# namespace; drop this one (it would only take space in the image).
if [[ -d "$ROOT/etc/postgresql/15/main" ]]; then
    chroot "$ROOT" pg_dropcluster 15 main > "$WORK/pg_dropcluster.log" 2>&1 \
        || die "pg_dropcluster 15 main failed: $(tail -n 3 "$WORK/pg_dropcluster.log")"
fi
umount "$ROOT/dev" "$ROOT/sys" "$ROOT/proc"
[[ -f "$ROOT/boot/initrd.img-$KVER" ]] || die "initrd $ROOT/boot/initrd.img-$KVER missing"
# lsinitramfs lives in the chroot; the host may not have initramfs-tools.
INITRD_LIST="$(chroot "$ROOT" lsinitramfs "/boot/initrd.img-$KVER")" || die "lsinitramfs failed"
for m in virtio_pci virtio_blk ext4; do
    grep -q "/$m\.ko" <<<"$INITRD_LIST" || die "module $m missing from the initramfs"
done

log "recording manifest and trimming the rootfs"
{
    echo "key: $KEY"
    echo "suite: $SUITE"
    echo "mirror: $MIRROR"
    echo "kernel: $KVER"
    echo "$ZFS_MANIFEST"
    echo "built: $(date -u +%FT%TZ)"
    echo "packages:"
    chroot "$ROOT" dpkg-query -W -f='  ${Package} ${Version}\n'
} > "$WORK/manifest.txt"
cp "$ROOT/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$WORK/initrd.img"
rm -rf "$ROOT"/usr/share/{doc,man,info,locale}/* "$ROOT"/var/cache/apt/archives/*.deb \
       "$ROOT"/var/lib/apt/lists/* "$ROOT"/boot/initrd.img-* "$ROOT"/debootstrap

log "creating ext4 root image"
USED_MB=$(du -sm --one-file-system "$ROOT" | cut -f1)
SIZE_MB=$(( USED_MB * 5 / 4 + 256 ))
mke2fs -q -F -t ext4 -L xe2e-root -m 0 -d "$ROOT" "$WORK/rootfs.img" "${SIZE_MB}M" >&2 \
    || die "mke2fs -d failed"
echo "rootfs: ${USED_MB} MiB used, image ${SIZE_MB} MiB (sparse)" >> "$WORK/manifest.txt"
echo "build-seconds: $(( $(date +%s) - T0 ))" >> "$WORK/manifest.txt"

rm -rf --one-file-system "$ROOT"
rm -rf "$OUT"
mkdir -p "$OUT"
mv "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/rootfs.img" "$WORK/manifest.txt" "$OUT/"
touch "$OUT/.complete"
log "image ready in $OUT (kernel $KVER, rootfs ${USED_MB} MiB, $(( $(date +%s) - T0 ))s)"
echo "$OUT"
