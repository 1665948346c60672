#!/bin/bash
# End-to-end test: the Linux NVMe/TCP initiator (in a QEMU guest) against nvmeof-blocking-target.
#
# Usage: tests/e2e/run.sh [options]
#   --scenario FILE     guest scenario script (default: tests/e2e/scenarios/nvme-tcp.sh)
#   --suite NAME        the same as --scenario tests/e2e/scenarios/NAME.sh (nvme-tcp, zfs, node, csi)
#   --only "A B ..."    run only these scenarios (names as printed in PASS/FAIL lines)
#   --target-log FILTER target log filter (default: debug; e.g. info, nvmeof_target=trace)
#   --timeout SECS      hard limit for the whole guest run (default: 2400)
#   --out DIR           where to keep logs (default: a new /tmp/xatastor-e2e.XXXXXX)
#   --no-cargo          do not run cargo build (use the existing target/release binary)
#   --kernel 6.1|6.12   the guest kernel (default: 6.1, Debian 12's; 6.12: bookworm-backports',
#                       with NVMe in-band authentication); each has its own cached image
#                       (build-image.sh --kernel); passed to the guest as E2E_KERNEL
#   --driver NAME       the target's driver: blocking (default) or io-uring (xatastor-core's server);
#                       also passed to the guest as E2E_DRIVER (the zfs suite's in-guest targets
#                       use it; they default to io-uring)
#   -v, --verbose       stream the guest console while it runs
#
# Steps: build/reuse the guest image (build-image.sh), build the target (cargo, release),
# start it on 127.0.0.1 with a free port and an in-memory 512 MiB namespace, boot the guest
# under QEMU TCG with the scenario script (passed through fw_cfg), collect one result line per
# scenario from the guest's second serial port, stop everything.
# While the guest runs, "ACTION <scenario> <command> ..." lines on that port make run.sh act on
# the host: `resize BYTES` (sent to the target's --control FIFO), `keepalive-mark CNTLID KATO`
# and `keepalive-check CNTLID KATO` (the keepalive-expiry scenario; its verdict is decided here,
# from target.log). A scenario fails if the guest or the host-side check says so.
# Commands that take a TOKEN are answered on the guest's third serial port (ttyS2, fed from the
# FIFO OUT/reply.in) with a line "REPLY TOKEN TEXT": `auth-target TOKEN OPTIONS...` (re)starts the
# second target instance (below) with these extra options, `auth-ctl TOKEN COMMAND...` sends a
# command to its control FIFO, `auth-log TOKEN REGEX` counts the matching lines of its log since
# its last start.
# A scenario file may ask for more, with header lines "# e2e-needs: WORD...":
#   scratch-disk=SIZE   a blank sparse raw disk of SIZE (truncate syntax, e.g. 4G), created in the
#                       out dir for this run, attached as a virtio disk with serial xe2e-scratch
#                       (the guest's init exports its device as E2E_SCRATCH_DEV)
#   guest-bin[=A,B..]   host-built binaries from $CARGO_TARGET_DIR/release (default:
#                       nvmeof-blocking-target; examples/NAME for a cargo example) on a read-only
#                       ext4 disk (serial xe2e-bin) that the guest mounts on /opt/xe2e-bin, first
#                       in its PATH (under their base names); without --no-cargo, run.sh builds them
#   guest-cmdline=A[,B] extra guest kernel command line arguments (e.g. hardened_usercopy=off)
#   guest-cmdline@K=A[,B]  the same, only when the guest kernel is K (--kernel K)
#   auth-target         a second target instance for the DH-HMAC-CHAP scenarios (64 MiB in memory,
#                       its own port, NQN and --control FIFO OUT/auth-control.fifo, log
#                       OUT/auth-target.log), which the guest restarts with the options it needs
# Prints "PASS <name>" / "FAIL <name>: <reason>" per scenario and "N passed, M failed";
# exits 1 if anything failed (or the guest did not finish), 2 on a harness error.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

SCENARIO="$HERE/scenarios/nvme-tcp.sh"
ONLY=""
TARGET_LOG="debug"
TIMEOUT=2400
OUT=""
CARGO=1
VERBOSE=0
DRIVER=blocking
DRIVER_SET=0
KERNEL=6.1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --scenario) SCENARIO="$(realpath "$2")"; shift 2 ;;
        --suite) SCENARIO="$HERE/scenarios/$2.sh"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --target-log) TARGET_LOG="$2"; shift 2 ;;
        --timeout) TIMEOUT="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --no-cargo) CARGO=0; shift ;;
        --driver) DRIVER="$2"; DRIVER_SET=1; shift 2 ;;
        --kernel) KERNEL="$2"; shift 2 ;;
        -v|--verbose) VERBOSE=1; shift ;;
        -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

# Fixed identities shared by the target's allow-list and the guest scenario.
NQN="nqn.2026-01.io.xatastor:e2e"
SERIAL="XSE2E0001"
# 512 MiB: mkfs.xfs (xfsprogs 6.1) refuses filesystems smaller than 300 MB.
SIZE_BYTES=$(( 512 << 20 ))
BLOCK_SIZE=512
HOSTNQN="nqn.2026-01.io.xatastor:e2e-guest"
HOSTID="6a0f3e5c-2b1d-4c8e-9f70-0e2e00000001"
BAD_HOSTNQN="nqn.2026-01.io.xatastor:e2e-intruder"
BAD_HOSTID="6a0f3e5c-2b1d-4c8e-9f70-0e2e000000ff"
# keepalive-expiry: the guest connects with this KATO (s); the target must tear the controller
# down at most KATO + KATO_MARGIN seconds after the guest's NIC went down.
KATO=5
KATO_MARGIN=2
# The second target instance (auth-target): what run.sh always gives it; the guest adds the rest
# (--host, --require-auth, --dhchap-*).
AUTH_NQN="nqn.2026-01.io.xatastor:e2e-auth"
AUTH_SERIAL="XSE2EAUTH01"
AUTH_SIZE_BYTES=$(( 64 << 20 ))
GUEST_MEM="${XATASTOR_E2E_GUEST_MEM:-2048}"
GUEST_CPUS="${XATASTOR_E2E_GUEST_CPUS:-2}"

case $KERNEL in
    6.1|6.12) ;;
    *) echo "run.sh: unknown --kernel '$KERNEL' (known: 6.1, 6.12)" >&2; exit 2 ;;
esac

T_START=$(date +%s)
log() { printf '[e2e %s +%ss] %s\n' "$(date +%T)" "$(( $(date +%s) - T_START ))" "$*" >&2; }
die() { printf '[e2e] ERROR: %s\n' "$*" >&2; exit 2; }

[[ -f $SCENARIO ]] || die "scenario script not found: $SCENARIO"
# What the scenario file asks for ("# e2e-needs: WORD..." lines).
NEED_SCRATCH=""   # size of the blank scratch disk, if any
NEED_BINS=()      # binaries to ship into the guest
NEED_CMDLINE=()   # extra guest kernel command line arguments
NEED_AUTH_TARGET=0 # a second target instance for the DH-HMAC-CHAP scenarios
for word in $(sed -n 's/^# e2e-needs://p' "$SCENARIO"); do
    case $word in
        scratch-disk=*) NEED_SCRATCH=${word#*=} ;;
        scratch-disk) NEED_SCRATCH=4G ;;
        guest-bin) NEED_BINS+=(nvmeof-blocking-target) ;;
        guest-bin=*) IFS=, read -r -a _bins <<<"${word#*=}"; NEED_BINS+=("${_bins[@]}") ;;
        guest-cmdline=*) IFS=, read -r -a _args <<<"${word#*=}"; NEED_CMDLINE+=("${_args[@]}") ;;
        auth-target) NEED_AUTH_TARGET=1 ;;
        guest-cmdline@*=*)
            _k=${word#guest-cmdline@}; _k=${_k%%=*}
            case $_k in 6.1|6.12) ;; *) die "$SCENARIO: '# e2e-needs: $word': unknown kernel '$_k' (known: 6.1, 6.12)" ;; esac
            if [[ $_k == "$KERNEL" ]]; then IFS=, read -r -a _args <<<"${word#*=}"; NEED_CMDLINE+=("${_args[@]}"); fi ;;
        *) die "$SCENARIO: unknown '# e2e-needs:' word: $word (known: scratch-disk[=SIZE], guest-bin[=A,B], guest-cmdline[@KERNEL]=ARG[,ARG], auth-target)" ;;
    esac
done
for tool in qemu-system-x86_64 timeout; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (apt-get install -t bookworm-backports qemu-system-x86)"
done
[[ $CARGO == 0 ]] || command -v cargo >/dev/null || die "missing tool: cargo"

if [[ -z $OUT ]]; then OUT="$(mktemp -d /tmp/xatastor-e2e.XXXXXX)"; else mkdir -p "$OUT"; fi
CONSOLE="$OUT/console.log"   # guest ttyS0: kernel + scenario output
RESULTS="$OUT/results.log"   # guest ttyS1: PLAN/PASS/FAIL/TIME/ACTION lines only
TARGET_LOGFILE="$OUT/target.log"
ACTIONS="$OUT/actions.log"   # what run.sh did for the guest's ACTION lines (host clock)
CONTROL="$OUT/control.fifo"  # the target's --control FIFO
REPLY_IN="$OUT/reply.in"     # run.sh -> guest ttyS2 (replies to ACTIONs with a token)
AUTH_LOGFILE="$OUT/auth-target.log"     # the second instance's stderr, all its runs
AUTH_CONTROL="$OUT/auth-control.fifo"   # its --control FIFO
AUTH_PIDFILE="$OUT/auth-target.pid"     # the pid of its current run
: > "$CONSOLE"; : > "$RESULTS"; : > "$TARGET_LOGFILE"; : > "$ACTIONS"; : > "$AUTH_LOGFILE"
rm -f "$CONTROL" "$REPLY_IN" "$AUTH_CONTROL" "$AUTH_PIDFILE"
mkfifo "$CONTROL" "$REPLY_IN" "$AUTH_CONTROL" || die "mkfifo in $OUT failed"
# QEMU's pipe chardev opens REPLY_IN for reading and reply.out for writing (the guest never
# writes to ttyS2; a regular file cannot fill up).
: > "$OUT/reply.out"

TARGET_PID=""
QEMU_PID=""
TAIL_PIDS=()
READER_PID=""
cleanup() {
    local rc=$?
    set +e
    [[ -n $QEMU_PID ]] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    [[ -n $TARGET_PID ]] && kill "$TARGET_PID" 2>/dev/null && wait "$TARGET_PID" 2>/dev/null
    [[ -s $AUTH_PIDFILE ]] && kill "$(cat "$AUTH_PIDFILE")" 2>/dev/null
    local p
    for p in "${TAIL_PIDS[@]}" $READER_PID; do kill "$p" 2>/dev/null; done
    # The extra disks are per run and reproducible; do not keep gigabytes of them in /tmp.
    [[ -n ${XATASTOR_E2E_KEEP_DISKS:-} || ! -d $OUT ]] || rm -f "$OUT/scratch.img" "$OUT/guest-bin.img"
    [[ -d $OUT ]] && echo "[e2e] logs: $OUT (console.log, target.log, results.log)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- (a) guest image -----------------------------------------------------------------------
log "guest image (kernel $KERNEL)"
IMAGE="$("$HERE/build-image.sh" --kernel "$KERNEL" | tail -n1)" || die "build-image.sh --kernel $KERNEL failed"
for f in vmlinuz initrd.img rootfs.img; do
    [[ -f $IMAGE/$f ]] || die "image $IMAGE lacks $f"
done
log "guest kernel: $(sed -n 's/^kernel: //p' "$IMAGE/manifest.txt" | head -n1)"

# --- (b) target binary ---------------------------------------------------------------------
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
BIN="$CARGO_TARGET_DIR/release/nvmeof-blocking-target"
# cargo_args BIN: what builds a guest-bin name (a binary, or examples/NAME for a cargo example).
cargo_args() {
    case $1 in
        nvmeof-blocking-target|xatastor-target) echo "-p xatastor-examples --bin $1" ;;
        examples/zfs_timing) echo "-p zvol-backend --example zfs_timing" ;;
        examples/*) echo "--example ${1#examples/}" ;;
        *) echo "--bin $1" ;;
    esac
}
if [[ $CARGO == 1 ]]; then
    log "cargo build --release -p xatastor-examples --bin nvmeof-blocking-target"
    (cd "$REPO" && cargo build --release -p xatastor-examples --bin nvmeof-blocking-target) \
        > "$OUT/cargo.log" 2>&1 || { tail -n 40 "$OUT/cargo.log" >&2; die "cargo build failed"; }
    # Whatever else the scenario ships into the guest (guest-bin=...).
    for b in "${NEED_BINS[@]}"; do
        [[ $b == nvmeof-blocking-target ]] && continue
        log "cargo build --release $(cargo_args "$b")"
        # shellcheck disable=SC2046 # word splitting of the arguments is intended
        (cd "$REPO" && cargo build --release $(cargo_args "$b")) \
            >> "$OUT/cargo.log" 2>&1 || { tail -n 40 "$OUT/cargo.log" >&2; die "cargo build $(cargo_args "$b") failed"; }
    done
fi
[[ -x $BIN ]] || die "target binary not found: $BIN"

# --- (c) target ----------------------------------------------------------------------------
# Port 0: the kernel picks a free port; the target prints the bound address.
log "starting target ($BIN --driver $DRIVER, log filter '$TARGET_LOG')"
NO_COLOR=1 "$BIN" --driver "$DRIVER" --listen 127.0.0.1:0 --memory "$SIZE_BYTES" --block-size "$BLOCK_SIZE" \
    --nqn "$NQN" --serial "$SERIAL" --host "$HOSTNQN" --log "$TARGET_LOG" --control "$CONTROL" \
    > "$TARGET_LOGFILE" 2>&1 &
TARGET_PID=$!
# Read-write, like the target: opening never blocks and writes never fail, even if the target
# has died (the pipe buffer is far larger than the few commands sent).
exec {CONTROL_FD}<>"$CONTROL"
PORT=""
for _ in $(seq 1 100); do
    PORT="$(sed -n 's/^serving .* on 127\.0\.0\.1:\([0-9]\+\)$/\1/p' "$TARGET_LOGFILE" | head -n1 || true)"
    [[ -n $PORT ]] && break
    kill -0 "$TARGET_PID" 2>/dev/null || { cat "$TARGET_LOGFILE" >&2; die "target exited at startup"; }
    sleep 0.1
done
[[ -n $PORT ]] || { cat "$TARGET_LOGFILE" >&2; die "target did not report its listening address"; }
log "target pid $TARGET_PID listening on 127.0.0.1:$PORT (guest: 10.0.2.2:$PORT)"

# The second instance (auth-target). It is (re)started from the ACTION reader too, so it is not
# a child of this shell: its pid is kept in AUTH_PIDFILE, and it is watched through /proc.
# proc_alive PID: the process exists and is not a zombie.
proc_alive() {
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [[ -n $st && $st != Z ]]
}
# Secrets in what run.sh itself writes: only their first characters.
mask_secrets() { sed -E 's/(DHHC-1:0[0-3]:[A-Za-z0-9+\/]{4})[A-Za-z0-9+\/=]*:/\1...:/g' <<<"$*"; }
# port_listening PORT: a socket listens on 127.0.0.1:PORT (/proc/net/tcp, state 0A).
port_listening() {
    awk -v p="$(printf '0100007F:%04X' "$1")" '$2 == p && $4 == "0A" {f = 1} END {exit !f}' /proc/net/tcp
}
auth_target_stop() {
    local pid i
    pid=$(cat "$AUTH_PIDFILE" 2>/dev/null) || return 0
    rm -f "$AUTH_PIDFILE"
    if ! proc_alive "$pid"; then
        echo "run.sh: auth target pid $pid had exited by itself" >> "$AUTH_LOGFILE"
    else
        kill "$pid" 2>/dev/null
        for i in $(seq 1 100); do
            proc_alive "$pid" || break
            (( i != 50 )) || kill -KILL "$pid" 2>/dev/null
            sleep 0.1
        done
    fi
    # The io_uring driver's listening sockets can outlive its process for a moment (the kernel
    # tears the ring down asynchronously): wait for them, so that the next run can bind the port.
    for i in $(seq 1 50); do
        [[ $AUTH_PORT != 0 ]] && port_listening "$AUTH_PORT" || break
        sleep 0.1
    done
    (( i == 1 )) || echo "run.sh: 127.0.0.1:$AUTH_PORT still listened on $(( i - 1 ))00 ms after pid $pid was gone" >> "$AUTH_LOGFILE"
    return 0
}
# auth_target_start [OPTIONS...]: stop the second instance if it runs, drop unread control
# commands, start it with the fixed options and these on AUTH_PORT (0: a free port) and wait for
# its "serving" line. Prints "ok serving on 127.0.0.1:PORT" or "error ...".
auth_target_start() {
    local n pid port="" line
    auth_target_stop
    while read -r -t 0.05 -u "$AUTH_CONTROL_FD" line; do :; done
    n=$(grep -c '^serving ' "$AUTH_LOGFILE" || true)
    echo "run.sh: starting the auth target with: $(mask_secrets "$*")" >> "$AUTH_LOGFILE"
    ( NO_COLOR=1 "$BIN" --driver "$DRIVER" --listen "127.0.0.1:$AUTH_PORT" --memory "$AUTH_SIZE_BYTES" \
        --block-size "$BLOCK_SIZE" --nqn "$AUTH_NQN" --serial "$AUTH_SERIAL" --control "$AUTH_CONTROL" \
        --log "$TARGET_LOG,nvmeof_target::auth=debug" "$@" < /dev/null >> "$AUTH_LOGFILE" 2>&1 &
      echo $! > "$AUTH_PIDFILE" )
    pid=$(cat "$AUTH_PIDFILE")
    for _ in $(seq 1 100); do
        port=$(grep '^serving ' "$AUTH_LOGFILE" | tail -n +$(( n + 1 )) | sed -n 's/.* on 127\.0\.0\.1:\([0-9]\+\)$/\1/p' | head -n1)
        [[ -n $port ]] && break
        proc_alive "$pid" || { echo "error: the auth target exited at startup: $(tail -n1 "$AUTH_LOGFILE")"; return; }
        sleep 0.1
    done
    [[ -n $port ]] || { echo "error: the auth target did not report its address within 10s"; return; }
    echo "ok serving on 127.0.0.1:$port"
}
# auth_log REGEX: how many lines of the second instance's log since its last start match REGEX
# (grep -E), and the last of them: "N | LINE".
auth_log() {
    local lines
    lines=$(awk '/^run\.sh: starting the auth target/ {n = NR} END {print n + 0}' "$AUTH_LOGFILE")
    tail -n +"$(( lines + 1 ))" "$AUTH_LOGFILE" | grep -E -- "$1" > "$OUT/auth-log.match"
    echo "$(wc -l < "$OUT/auth-log.match") | $(tail -n1 "$OUT/auth-log.match" | cut -c1-400)"
}
AUTH_PORT=0
AUTH_CONTROL_FD=""
if [[ $NEED_AUTH_TARGET == 1 ]]; then
    exec {AUTH_CONTROL_FD}<>"$AUTH_CONTROL"
    reply=$(auth_target_start)
    [[ $reply == "ok "* ]] || { cat "$AUTH_LOGFILE" >&2; die "auth target: $reply"; }
    AUTH_PORT=${reply##*:}
    log "auth target pid $(cat "$AUTH_PIDFILE") listening on 127.0.0.1:$AUTH_PORT (guest: 10.0.2.2:$AUTH_PORT)"
fi
# Replies to the guest (read-write, like the control FIFO: never blocks, never fails).
exec {REPLY_FD}<>"$REPLY_IN"

# --- (d) guest -----------------------------------------------------------------------------
cat > "$OUT/env.sh" <<EOF
E2E_ADDR=10.0.2.2
E2E_PORT=$PORT
E2E_NQN=$NQN
E2E_SERIAL=$SERIAL
E2E_SIZE_BYTES=$SIZE_BYTES
E2E_BLOCK_SIZE=$BLOCK_SIZE
E2E_HOSTNQN=$HOSTNQN
E2E_HOSTID=$HOSTID
E2E_BAD_HOSTNQN=$BAD_HOSTNQN
E2E_BAD_HOSTID=$BAD_HOSTID
E2E_ONLY="$ONLY"
E2E_KATO=$KATO
E2E_KERNEL=$KERNEL
EOF
[[ $NEED_AUTH_TARGET == 0 ]] || cat >> "$OUT/env.sh" <<EOF
E2E_AUTH_PORT=$AUTH_PORT
E2E_AUTH_NQN=$AUTH_NQN
E2E_AUTH_SERIAL=$AUTH_SERIAL
E2E_AUTH_SIZE_BYTES=$AUTH_SIZE_BYTES
EOF
[[ $DRIVER_SET == 0 ]] || echo "E2E_DRIVER=$DRIVER" >> "$OUT/env.sh"
# Scenario files pull shared helpers in with '# e2e-include: FILE...' lines (paths relative to
# scenarios/): the guest gets one self-contained script.
expand_includes() {
    local line f
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ $line == "# e2e-include: "* ]]; then
            for f in ${line#"# e2e-include: "}; do
                [[ -f $HERE/scenarios/$f ]] || die "$SCENARIO: '# e2e-include:' file not found: scenarios/$f"
                echo "# ---- scenarios/$f ----"
                cat "$HERE/scenarios/$f"
                echo "# ---- end of scenarios/$f ----"
            done
        else
            printf '%s\n' "$line"
        fi
    done < "$1"
}
expand_includes "$SCENARIO" > "$OUT/scenario.sh"

# Extra disks the scenario asked for. The guest finds them by serial number, not by name; they
# sit in high PCI slots so that the root disk (if=virtio, the first free slot) is still the
# first virtio disk the guest probes, /dev/vda (QEMU creates -device disks before if=virtio ones).
EXTRA_DRIVES=()
if [[ ${#NEED_BINS[@]} -gt 0 ]]; then
    command -v mke2fs >/dev/null || die "missing tool: mke2fs (e2fsprogs), needed for guest-bin"
    rm -rf "$OUT/guest-bin" && mkdir -p "$OUT/guest-bin"
    for b in "${NEED_BINS[@]}"; do
        [[ -x $CARGO_TARGET_DIR/release/$b ]] || die "guest-bin: $CARGO_TARGET_DIR/release/$b not found (build it first)"
        # A copy: a concurrent cargo build must not change the binary under the guest.
        cp "$CARGO_TARGET_DIR/release/$b" "$OUT/guest-bin/${b##*/}"
    done
    BIN_MB=$(( $(du -sm "$OUT/guest-bin" | cut -f1) + 16 ))
    mke2fs -q -F -t ext4 -O ^has_journal -L xe2e-bin -m 0 -d "$OUT/guest-bin" "$OUT/guest-bin.img" "${BIN_MB}M" >&2 \
        || die "mke2fs -d $OUT/guest-bin failed"
    rm -rf "$OUT/guest-bin"
    EXTRA_DRIVES+=(-drive "file=$OUT/guest-bin.img,if=none,id=xbin,format=raw,readonly=on"
                   -device "virtio-blk-pci,drive=xbin,serial=xe2e-bin,addr=0x10")
    log "guest-bin: ${NEED_BINS[*]} on a ${BIN_MB} MiB read-only ext4 disk (guest: /opt/xe2e-bin)"
fi
if [[ -n $NEED_SCRATCH ]]; then
    rm -f "$OUT/scratch.img"
    truncate -s "$NEED_SCRATCH" "$OUT/scratch.img" || die "cannot create the scratch disk ($NEED_SCRATCH)"
    # cache=unsafe: the file is thrown away after the run; host flushes would only slow TCG down.
    EXTRA_DRIVES+=(-drive "file=$OUT/scratch.img,if=none,id=xscratch,format=raw,cache=unsafe,discard=unmap"
                   -device "virtio-blk-pci,drive=xscratch,serial=xe2e-scratch,addr=0x11")
    log "scratch disk: $OUT/scratch.img, $NEED_SCRATCH sparse (guest: serial xe2e-scratch)"
fi

[[ ${#NEED_CMDLINE[@]} -eq 0 ]] || log "guest kernel command line also gets: ${NEED_CMDLINE[*]}"

QEMU=(
    qemu-system-x86_64 -accel tcg -cpu max -smp "$GUEST_CPUS" -m "$GUEST_MEM"
    -nodefaults -no-user-config -no-reboot -display none -monitor none
    -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img"
    -append "console=ttyS0 root=/dev/vda rw init=/sbin/xe2e-init panic=-1 quiet${NEED_CMDLINE[*]:+ ${NEED_CMDLINE[*]}}"
    # The cached image is shared: never write to it.
    -drive "file=$IMAGE/rootfs.img,if=virtio,format=raw,snapshot=on"
    "${EXTRA_DRIVES[@]}"
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0
    -fw_cfg "name=opt/xatastor/scenario,file=$OUT/scenario.sh"
    -fw_cfg "name=opt/xatastor/env,file=$OUT/env.sh"
    -serial "file:$CONSOLE" -serial "file:$RESULTS" -serial "pipe:$OUT/reply"
)
printf '%q ' "${QEMU[@]}" > "$OUT/qemu.cmdline"
log "booting guest (TCG, ${GUEST_CPUS} cpus, ${GUEST_MEM} MiB, hard timeout ${TIMEOUT}s)"
T_BOOT=$(date +%s)
timeout -k 10 "$TIMEOUT" "${QEMU[@]}" > "$OUT/qemu.log" 2>&1 &
QEMU_PID=$!

# --- guest requests ("ACTION <scenario> <command> [args]" on ttyS1), served while it runs --
now_s() { date +%s.%N; }
# control_to FD LOGFILE CMD...: send one command to a target's control FIFO, wait (5 s at most)
# for its "control:" reply in its log.
control_to() {
    local fd=$1 logfile=$2 n i reply=""
    shift 2
    n=$(grep -c '^control: ' "$logfile")
    echo "$*" >&"$fd"
    for i in $(seq 1 50); do
        reply=$(grep '^control: ' "$logfile" | tail -n +$(( n + 1 )) | head -n1)
        [[ -n $reply ]] && break
        sleep 0.1
    done
    echo "${reply:-control: no reply within 5s}"
}
# control CMD...: the same for the main target.
control() { control_to "$CONTROL_FD" "$TARGET_LOGFILE" "$@"; }
# One line per ACTION in actions.log: "<host time> <scenario> <command> <args> | <outcome>".
serve_actions() {
    set +e
    local line name cmd args t reply token
    while IFS= read -r line; do
        line=${line%$'\r'}
        [[ $line == "ACTION "* ]] || continue
        t=$(now_s)
        read -r name cmd args <<<"${line#ACTION }"
        token=""
        case $cmd in
            resize) reply=$(control resize "$args") ;;
            keepalive-mark|keepalive-check) reply=$(control controllers) ;;
            auth-target|auth-ctl|auth-log)
                read -r token args <<<"$args"
                if [[ -z $AUTH_CONTROL_FD ]]; then reply="error: no auth target (the scenario file lacks '# e2e-needs: auth-target')"
                elif [[ $cmd == auth-target ]]; then
                    # shellcheck disable=SC2086 # the options are words
                    reply=$(auth_target_start $args)
                elif [[ $cmd == auth-ctl ]]; then reply=$(control_to "$AUTH_CONTROL_FD" "$AUTH_LOGFILE" "$args")
                else reply=$(auth_log "$args"); fi ;;
            *) reply="unknown action" ;;
        esac
        [[ -z $token ]] || echo "REPLY $token $reply" >&"$REPLY_FD"
        echo "$t $name $cmd $(mask_secrets "$args") | $reply" >> "$ACTIONS"
        echo "[e2e] guest action: $name $cmd $(mask_secrets "$args") -> $reply" >&2
    done
}
tail --pid="$QEMU_PID" -n +1 -F "$RESULTS" 2>/dev/null | serve_actions &
READER_PID=$!

# Live progress on stderr (the canonical result lines are printed at the end, on stdout).
tail --pid="$QEMU_PID" -n +1 -F "$RESULTS" 2>/dev/null | sed -u -n 's/\r$//; s/^\(PASS\|FAIL\)/[e2e] guest: &/p' >&2 &
TAIL_PIDS+=($!)
if [[ $VERBOSE == 1 ]]; then
    tail --pid="$QEMU_PID" -n +1 -F "$CONSOLE" 2>/dev/null | sed -u 's/^/  | /' >&2 &
    TAIL_PIDS+=($!)
fi

set +e
wait "$QEMU_PID"
QEMU_RC=$?
set -e
QEMU_PID=""
T_GUEST=$(( $(date +%s) - T_BOOT ))
sleep 0.5 # let the tails catch up
# The action reader ends with its tail (at QEMU's exit); it may be finishing a control command.
for _ in $(seq 1 100); do kill -0 "$READER_PID" 2>/dev/null || break; sleep 0.1; done
kill "$READER_PID" 2>/dev/null || true
READER_PID=""
log "guest finished after ${T_GUEST}s (qemu exit status $QEMU_RC)"

# --- (f) stop the target -------------------------------------------------------------------
TARGET_ALIVE=1
kill -0 "$TARGET_PID" 2>/dev/null || TARGET_ALIVE=0
if [[ $TARGET_ALIVE == 1 ]]; then
    kill "$TARGET_PID" 2>/dev/null || true
    wait "$TARGET_PID" 2>/dev/null || true
    TARGET_RC="killed by the harness"
else
    set +e; wait "$TARGET_PID"; TARGET_RC="exited with status $?"; set -e
fi
TARGET_PID=""
# The second instance: still running (then stopped here), or it died by itself.
AUTH_DIED=""
if [[ $NEED_AUTH_TARGET == 1 ]]; then
    if [[ -s $AUTH_PIDFILE ]] && proc_alive "$(cat "$AUTH_PIDFILE")"; then
        auth_target_stop
    else
        AUTH_DIED="it was not running when the guest ended"
    fi
    grep -q '^run\.sh: auth target pid .* had exited by itself' "$AUTH_LOGFILE" \
        && AUTH_DIED="${AUTH_DIED:+$AUTH_DIED; }$(grep -m1 '^run\.sh: auth target pid .* had exited by itself' "$AUTH_LOGFILE" | sed 's/^run\.sh: //')"
fi

# --- (e) results ---------------------------------------------------------------------------
tr -d '\r' < "$RESULTS" > "$OUT/results.txt"
PLAN="$(sed -n 's/^PLAN //p' "$OUT/results.txt" | tail -n1)"
# Host-side verdicts, from what the guest asked for (ACTION lines) and what run.sh saw.
# log_epoch LINE: the time of a target.log line (its RFC 3339 timestamp), in epoch seconds.
log_epoch() { date -d "$(cut -d' ' -f1 <<<"$1")" +%s.%N 2>/dev/null; }
# keepalive_verdict NAME: why the keep-alive check of scenario NAME failed; empty if it passed.
keepalive_verdict() {
    local name=$1 mark check cntlid kato t_mark t_check line t_down delay reason=""
    mark=$(grep -E "^[0-9.]+ $name keepalive-mark " "$ACTIONS" | tail -n1)
    check=$(grep -E "^[0-9.]+ $name keepalive-check " "$ACTIONS" | tail -n1)
    [[ -n $mark ]] || { echo "run.sh did not see the guest's keepalive-mark"; return; }
    [[ -n $check ]] || { echo "run.sh did not see the guest's keepalive-check"; return; }
    read -r t_mark _ _ cntlid kato _ <<<"$mark"
    read -r t_check _ <<<"$check"
    # At the mark the controller was live, with the KATO the guest asked for.
    if ! grep -qE "cntlid=$cntlid [^;]*kato_ms=$(( kato * 1000 ))(;|\$)" <<<"${mark#*|}"; then
        echo "at the mark, the target did not list cntlid $cntlid with kato_ms=$(( kato * 1000 )): ${mark#*| }"
        return
    fi
    # When the guest stopped waiting (KATO + 3 s), the controller was gone.
    if grep -qE "cntlid=$cntlid( |;|\$)" <<<"${check#*|}"; then
        reason="the target still listed controller $cntlid $(awk -v a="$t_mark" -v b="$t_check" 'BEGIN {printf "%.1f", b - a}')s after the link went down (KATO ${kato}s); "
    fi
    line=$(grep -E "keep-alive timeout: controller torn down.*cntlid=(Some\()?$cntlid\b" "$TARGET_LOGFILE" | head -n1)
    if [[ -z $line ]]; then
        local other
        other=$(grep -E "cntlid=$cntlid[ }].*closing reason=" "$TARGET_LOGFILE" | head -n1)
        echo "${reason}no 'keep-alive timeout: controller torn down' for cntlid $cntlid in target.log${other:+; first close: $other}"
        return
    fi
    t_down=$(log_epoch "$line")
    [[ -n $t_down ]] || { echo "${reason}cannot read the time of: $line"; return; }
    delay=$(awk -v a="$t_mark" -v b="$t_down" 'BEGIN {printf "%.2f", b - a}')
    echo "[e2e] keepalive-expiry: target tore down cntlid $cntlid ${delay}s after the guest's link went down (KATO ${kato}s, limit $(( kato + KATO_MARGIN ))s)" >&2
    if awk -v d="$delay" 'BEGIN {exit !(d < 0)}'; then
        reason+="controller $cntlid torn down ${delay}s BEFORE the link went down; "
    elif awk -v d="$delay" -v l="$(( kato + KATO_MARGIN ))" 'BEGIN {exit !(d > l)}'; then
        reason+="controller $cntlid torn down ${delay}s after the link went down, later than KATO ${kato}s + ${KATO_MARGIN}s; "
    fi
    echo "${reason%; }"
}
# secret_leaks NAME: the secrets the guest gave the auth target for scenario NAME (in its ACTION
# lines) that appear in the auth target's log, as base64 (the DHHC-1 form) or as hex; empty if none.
secret_leaks() {
    local s b64 hex out=""
    for s in $(grep -E "^ACTION $1 auth-(target|ctl) " "$OUT/results.txt" | grep -oE 'DHHC-1:0[0-3]:[A-Za-z0-9+/=]+:' | sort -u); do
        b64=${s#DHHC-1:???}; b64=${b64%:}
        hex=$(base64 -d <<<"$b64" 2>/dev/null | od -An -tx1 -v | tr -d ' \n' | cut -c1-64)
        if grep -qF -- "$b64" "$AUTH_LOGFILE" || { [[ -n $hex ]] && grep -qiF -- "$hex" "$AUTH_LOGFILE"; }; then
            out+="$(mask_secrets "$s") "
        fi
    done
    echo "${out% }"
}
# host_verdict NAME: why the host side fails scenario NAME; empty if it has nothing against it.
host_verdict() {
    local name=$1 r="" bad k
    # Every control command the scenario needed must have succeeded.
    bad=$(grep -E "^[0-9.]+ $name resize " "$ACTIONS" | grep -v '| control: ok' | head -n1 || true)
    [[ -z $bad ]] || r="target control command failed: ${bad#* $name }"
    # No secret in the target's log.
    if [[ $NEED_AUTH_TARGET == 1 ]]; then
        k=$(secret_leaks "$name")
        [[ -z $k ]] || r+="${r:+; }the target's log shows a secret it was given: $k"
    fi
    if [[ $name == keepalive-expiry ]]; then
        k=$(keepalive_verdict "$name")
        [[ -z $k ]] || r+="${r:+; }$k"
    fi
    echo "$r"
}

passed=0
failed=0
report() { # report PASS|FAIL name [reason]
    if [[ $1 == PASS ]]; then
        echo "PASS $2"; passed=$(( passed + 1 ))
    else
        echo "FAIL $2: $3"; failed=$(( failed + 1 ))
    fi
}
if [[ -z $PLAN ]]; then
    report FAIL guest-boot "the guest never started the scenario (qemu status $QEMU_RC); see $CONSOLE"
fi
for name in $PLAN; do
    line="$(grep -E "^(PASS|FAIL) $name(:|\$)" "$OUT/results.txt" | tail -n1 || true)"
    host="$(host_verdict "$name")"
    if [[ -z $line ]]; then
        why="no result"
        if [[ $QEMU_RC == 124 || $QEMU_RC == 137 ]]; then why+=" (guest killed by the ${TIMEOUT}s timeout)"
        elif ! grep -q '^E2E-GUEST-END' "$OUT/results.txt"; then why+=" (guest ended early, qemu status $QEMU_RC)"; fi
        report FAIL "$name" "$why${host:+ [host: $host]}"
    elif [[ $line == PASS* && -z $host ]]; then
        report PASS "$name"
    elif [[ $line == PASS* ]]; then
        report FAIL "$name" "$host"
    else
        report FAIL "$name" "${line#FAIL "$name": }${host:+ [host: $host]}"
    fi
done
# The target must survive everything the initiator did to it.
if [[ $TARGET_ALIVE == 0 ]]; then
    report FAIL target-process "the target died during the run ($TARGET_RC); see $TARGET_LOGFILE"
elif grep -q 'panicked at' "$TARGET_LOGFILE"; then
    report FAIL target-process "a target thread panicked: $(grep -m1 'panicked at' "$TARGET_LOGFILE")"
fi
if [[ -n $AUTH_DIED ]]; then
    report FAIL auth-target-process "the auth target died during the run: $AUTH_DIED; see $AUTH_LOGFILE"
elif [[ $NEED_AUTH_TARGET == 1 ]] && grep -q 'panicked at' "$AUTH_LOGFILE"; then
    report FAIL auth-target-process "an auth target thread panicked: $(grep -m1 'panicked at' "$AUTH_LOGFILE")"
fi

T_TOTAL=$(( $(date +%s) - T_START ))
BOOT_S="$(sed -n 's/.*running scenario (uptime \([0-9.]*s\)).*/\1/p' "$CONSOLE" | head -n1)"
{
    echo "timings: total ${T_TOTAL}s, guest ${T_GUEST}s (scenario started at guest uptime ${BOOT_S:-?}); kernel $KERNEL, driver $DRIVER"
    sed -n 's/^TIME /  /p; s/^INFO /  info: /p' "$OUT/results.txt"
} >&2
echo "$passed passed, $failed failed"
[[ $failed == 0 ]]
