#!/bin/bash
# PID 1 of the xatastor e2e guest (baked into the image by build-image.sh).
#
# It sets up a minimal userland (proc/sys/dev/tmp, loopback + QEMU user-net eth0),
# loads the scenario supplied at run time through QEMU fw_cfg:
#   opt/xatastor/env       shell variable assignments (E2E_*), sourced first
#   opt/xatastor/scenario  the bash script to run
# runs it, prints an end marker, and powers the VM off. stdout/stderr go to the
# console (ttyS0); scenarios write machine-readable result lines to ttyS1.
# Extra virtio disks that run.sh attaches for scenarios that ask for them (`# e2e-needs:`
# in the scenario file) are recognised by their serial number:
#   xe2e-bin      read-only ext4 with host-built binaries: mounted on /opt/xe2e-bin, which is
#                 put first in PATH (E2E_BIN_DIR)
#   xe2e-scratch  a blank disk (e.g. for a zpool): its device node is exported as E2E_SCRATCH_DEV
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8
umask 022

say() { echo "[e2e-init] $*"; }
die_off() {
    say "FATAL: $*"
    echo "E2E-GUEST-END rc=255" > /dev/ttyS1 2>/dev/null || true
    sync
    echo o > /proc/sysrq-trigger
    sleep 30
}

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts devpts /dev/pts
mountpoint -q /run || mount -t tmpfs -o mode=0755 tmpfs /run
mountpoint -q /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -o remount,rw / 2>/dev/null || true
echo 1 > /proc/sys/kernel/sysrq 2>/dev/null || true
hostname xe2e-guest 2>/dev/null || true

say "kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo), uptime $(cut -d' ' -f1 /proc/uptime)s"

modprobe qemu_fw_cfg 2>/dev/null || true
FWCFG=/sys/firmware/qemu_fw_cfg/by_name/opt/xatastor
for _ in $(seq 1 50); do [ -e "$FWCFG/scenario/raw" ] && break; sleep 0.1; done
[ -e "$FWCFG/scenario/raw" ] || die_off "no scenario in fw_cfg ($FWCFG/scenario/raw missing)"

# Network: QEMU user-mode networking (slirp), host reachable at 10.0.2.2.
modprobe virtio_net 2>/dev/null || true
ip link set lo up
for _ in $(seq 1 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2 dev eth0
else
    say "WARNING: no eth0"
fi

for b in /sys/block/vd*; do
    [ -e "$b/serial" ] || continue
    case "$(cat "$b/serial" 2>/dev/null)" in
        xe2e-bin)
            mkdir -p /opt/xe2e-bin
            if mount -t ext4 -o ro,noload "/dev/${b##*/}" /opt/xe2e-bin; then
                export PATH="/opt/xe2e-bin:$PATH" E2E_BIN_DIR=/opt/xe2e-bin
                say "binaries disk /dev/${b##*/} on /opt/xe2e-bin: $(ls /opt/xe2e-bin | tr '\n' ' ')"
            else
                say "WARNING: cannot mount the binaries disk /dev/${b##*/}"
            fi ;;
        xe2e-scratch)
            export E2E_SCRATCH_DEV="/dev/${b##*/}"
            say "scratch disk $E2E_SCRATCH_DEV ($(cat "$b/size") sectors)" ;;
    esac
done

mkdir -p /run/e2e
cat "$FWCFG/scenario/raw" > /run/e2e/scenario.sh
if [ -e "$FWCFG/env/raw" ]; then cat "$FWCFG/env/raw" > /run/e2e/env.sh; else : > /run/e2e/env.sh; fi
chmod +x /run/e2e/scenario.sh

say "running scenario (uptime $(cut -d' ' -f1 /proc/uptime)s)"
set +e
( set -a; . /run/e2e/env.sh; set +a; cd /run/e2e && exec /bin/bash ./scenario.sh ) < /dev/null
rc=$?
say "scenario exited rc=$rc (uptime $(cut -d' ' -f1 /proc/uptime)s)"
echo "E2E-GUEST-END rc=$rc" > /dev/ttyS1
sync
echo o > /proc/sysrq-trigger
sleep 30
