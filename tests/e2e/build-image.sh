#!/bin/bash
# Build (or reuse) the Debian bookworm guest image for the NVMe/TCP end-to-end tests.
#
# Usage: tests/e2e/build-image.sh [--kernel 6.1|6.12] [--force]
#
#   --kernel 6.1   (default) Debian 12's own kernel, linux-image-amd64 from bookworm, with
#                  ZFS 2.1 (zfs-dkms, zfsutils-linux) from bookworm contrib
#   --kernel 6.12  bookworm-backports' kernel (linux-image-amd64 -t bookworm-backports, i.e.
#                  linux-image-6.12.*+deb12-amd64) with ZFS 2.3 from bookworm-backports contrib
#                  (bookworm's ZFS 2.1 does not build for 6.12; the userland must match the module)
#   Everything else in the root file system is the same bookworm package set for both.
#
# The image is cached outside the repository, in
#   ${XATASTOR_E2E_CACHE:-/var/cache/xatastor-e2e}/<kernel>-<hash>/
# where <hash> is a hash of the kernel choice, this script and guest/init.sh (the guest's
# PID 1, baked into the image), so editing either one (e.g. the package list) builds a
# new image. The directory holds:
#   vmlinuz      the guest kernel
#   initrd.img   the Debian initramfs (loads virtio_blk + ext4, mounts /dev/vda)
#   rootfs.img   raw ext4 image of the debootstrap'd root filesystem
#                (boot it read-only / with snapshot=on: it is shared by every run)
#   manifest.txt kernel version, ZFS version, package versions, build time
#
# ZFS: zfs-dkms and zfsutils-linux come from Debian's contrib component (bookworm's for 6.1,
# bookworm-backports' for 6.12). The module is built by
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
BACKPORTS=bookworm-backports
# Packages installed in the guest (besides debootstrap's minbase set). The kernel is added below.
PACKAGES=(
    initramfs-tools zstd
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
KERNEL=6.1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) FORCE=1; shift ;;
        --kernel) KERNEL="${2:-}"; shift 2 || { echo "build-image.sh: --kernel needs a value" >&2; exit 2; } ;;
        -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "build-image.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
# Per kernel: where the kernel and ZFS come from (apt -t target release), and the pattern the
# installed kernel's version must match.
case "$KERNEL" in
    6.1)
        # debootstrap installs the kernel with the rest; ZFS from bookworm contrib.
        PACKAGES+=(linux-image-amd64)
        KERNEL_RELEASE=""
        KVER_GLOB="6.1.*-amd64"
        ZFS_RELEASE="" ;;
    6.12)
        # Installed with apt-get from bookworm-backports after debootstrap (debootstrap knows one
        # suite only); its ZFS as well.
        KERNEL_RELEASE=$BACKPORTS
        KVER_GLOB="6.12.*+deb12-amd64"
        ZFS_RELEASE=$BACKPORTS ;;
    *) echo "build-image.sh: unknown --kernel '$KERNEL' (known: 6.1, 6.12)" >&2; exit 2 ;;
esac

log() { printf '[build-image %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

KEY="$KERNEL-$({ echo "kernel=$KERNEL"; cat "$HERE/build-image.sh" "$HERE/guest/init.sh"; } | sha256sum | cut -c1-16)"
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

# One builder at a time per image (the kernels' images can be built side by side).
exec 9>"$CACHE/.lock-$KEY"
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

# --- apt in the chroot ------------------------------------------------------------------------
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
# apt-get in the chroot resolves the mirror's name with the host's resolver.
RESOLV_COPIED=0
if [[ ! -s $ROOT/etc/resolv.conf ]]; then
    rm -f "$ROOT/etc/resolv.conf"
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    RESOLV_COPIED=1
fi
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
# contrib for ZFS; bookworm-backports (priority 100 by default: only what is asked for with
# -t comes from it) for the 6.12 kernel and its ZFS.
{
    echo "deb $MIRROR $SUITE main contrib"
    [[ -z $KERNEL_RELEASE && -z $ZFS_RELEASE ]] || echo "deb $MIRROR $BACKPORTS main contrib"
} > "$ROOT/etc/apt/sources.list"
log "apt-get update in the chroot ($(sed 's/^deb [^ ]* //' "$ROOT/etc/apt/sources.list" | tr '\n' ';'))"
capt update > "$WORK/apt-update.log" 2>&1 || { tail -n 20 "$WORK/apt-update.log" >&2; die "apt-get update in the chroot failed"; }

# The small initramfs (only what mounts /dev/vda), configured before a kernel is installed
# with apt-get, so that its postinst does not build a full one first.
mkdir -p "$ROOT/etc/initramfs-tools/conf.d"
printf 'MODULES=list\nCOMPRESS=zstd\n' > "$ROOT/etc/initramfs-tools/conf.d/xe2e.conf"
printf '%s\n' "${INITRD_MODULES[@]}" > "$ROOT/etc/initramfs-tools/modules"

if [[ -n $KERNEL_RELEASE ]]; then
    t_kernel=$(date +%s)
    log "installing linux-image-amd64 from $KERNEL_RELEASE"
    capt install -t "$KERNEL_RELEASE" linux-image-amd64 > "$WORK/kernel.log" 2>&1 \
        || { tail -n 20 "$WORK/kernel.log" >&2; die "apt-get install -t $KERNEL_RELEASE linux-image-amd64 failed"; }
    log "kernel installed ($(( $(date +%s) - t_kernel ))s)"
fi

KVERS=("$ROOT"/lib/modules/*)
[[ ${#KVERS[@]} == 1 && -d ${KVERS[0]} ]] || die "expected exactly one kernel in $ROOT/lib/modules, found: ${KVERS[*]}"
KVER="$(basename "${KVERS[0]}")"
# shellcheck disable=SC2053 # a glob match is intended
[[ $KVER == $KVER_GLOB ]] || die "--kernel $KERNEL installed kernel $KVER, expected $KVER_GLOB"
[[ -f "$ROOT/boot/vmlinuz-$KVER" ]] || die "kernel image $ROOT/boot/vmlinuz-$KVER missing"
for m in nvme-tcp nvme-fabrics nvme-core nvmet nvmet-tcp xfs virtio_net qemu_fw_cfg; do
    [[ -n "$(find "$ROOT/lib/modules/$KVER" -name "${m//-/[-_]}.ko*")" ]] \
        || grep -qw "${m//-/_}" "$ROOT/lib/modules/$KVER/modules.builtin" \
        || die "kernel $KVER has no module $m"
done
# NVMe in-band authentication (DH-HMAC-CHAP), host and target side, and hardened usercopy:
# recorded in the manifest. The 6.12 image exists for authentication, so there it is required.
KCONFIG="$ROOT/boot/config-$KVER"
[[ -f $KCONFIG ]] || die "kernel config $KCONFIG missing"
KCONFIG_MANIFEST="$(grep -E '^(# )?CONFIG_(NVME_(HOST_|TARGET_)?AUTH|NVME_TCP_TLS|CRYPTO_DH_RFC7919_GROUPS|HARDENED_USERCOPY)[ =]' "$KCONFIG" \
    | sed 's/^# \(.*\) is not set/\1=n/' | sort | tr '\n' ' ')"
if [[ $KERNEL != 6.1 ]]; then
    for c in CONFIG_NVME_HOST_AUTH=y CONFIG_NVME_TARGET_AUTH=y; do
        grep -qx "$c" "$KCONFIG" || die "kernel $KVER lacks $c (needed for the DH-HMAC-CHAP scenarios)"
    done
fi

for b in initdb pg_ctl postgres pg_controldata psql pgbench; do
    [[ -x "$ROOT$PG_BINDIR/$b" ]] || die "PostgreSQL binary $PG_BINDIR/$b missing"
done
grep -q '^postgres:' "$ROOT/etc/passwd" || die "no postgres user in the guest"

# --- ZFS ------------------------------------------------------------------------------------
install_zfs() {
    local t0 log_ zver zpkgver rel=()
    t0=$(date +%s)
    log_="$WORK/zfs.log"
    : > "$log_"
    [[ -z $ZFS_RELEASE ]] || rel=(-t "$ZFS_RELEASE")
    # Headers of exactly the guest kernel, first: zfs-dkms's postinst then finds a kernel to
    # build for. `uname -r` in the chroot is the host kernel, whose headers are absent, so
    # dkms skips it ("belongs to a chroot's host"); the explicit build below does not rely on
    # the postinst either way.
    log "ZFS: installing linux-headers-$KVER"
    capt install "${rel[@]}" "linux-headers-$KVER" >> "$log_" 2>&1 \
        || { tail -n 20 "$log_" >&2; die "apt-get install linux-headers-$KVER failed"; }
    log "ZFS: installing ${ZFS_PACKAGES[*]}${ZFS_RELEASE:+ from $ZFS_RELEASE} (zfs-dkms's postinst compiles the module: minutes)"
    if ! capt install "${rel[@]}" "${ZFS_PACKAGES[@]}" >> "$log_" 2>&1; then
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
    ZFS_MANIFEST="zfs: $zpkgver (zfs-dkms + zfsutils-linux $(cchroot dpkg-query -W -f='${Version}' zfsutils-linux), ${ZFS_RELEASE:-$SUITE} contrib)"
    ZFS_MANIFEST+=$'\n'"zfs-module: $(sed -n 's/^version: *//p' "$WORK/zfs-modinfo.txt") for $KVER in /lib/modules/$KVER/updates/dkms ($(cd "$ROOT/lib/modules/$KVER/updates/dkms" && ls | tr '\n' ' '))"
    ZFS_MANIFEST+=$'\n'"zfs-build-seconds: $(( $(date +%s) - t0 ))"
}
ZFS_MANIFEST=""
install_zfs
rm -f "$ROOT/usr/sbin/policy-rc.d"
capt clean > /dev/null 2>&1 || true
[[ $RESOLV_COPIED == 0 ]] || rm -f "$ROOT/etc/resolv.conf"

log "configuring guest (init, hostname, nvme)"
install -m 0755 "$HERE/guest/init.sh" "$ROOT/sbin/xe2e-init"
echo xe2e-guest > "$ROOT/etc/hostname"
echo "127.0.0.1 localhost xe2e-guest" > "$ROOT/etc/hosts"
: > "$ROOT/etc/fstab"
mkdir -p "$ROOT/etc/nvme"

# Small, deterministic initramfs (configured above): only what is needed to mount /dev/vda.
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
# (Built into the kernel counts: 6.12 has virtio_pci built in.)
for m in virtio_pci virtio_blk ext4; do
    grep -q "/$m\.ko" <<<"$INITRD_LIST" || grep -q "/$m\.ko\$" "$ROOT/lib/modules/$KVER/modules.builtin" \
        || die "module $m is neither in the initramfs nor built into $KVER"
done

log "recording manifest and trimming the rootfs"
{
    echo "key: $KEY"
    echo "suite: $SUITE"
    echo "mirror: $MIRROR"
    echo "kernel: $KVER (--kernel $KERNEL, linux-image-amd64 from ${KERNEL_RELEASE:-$SUITE})"
    echo "kernel-config: $KCONFIG_MANIFEST"
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
