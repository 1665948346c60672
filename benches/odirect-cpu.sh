#!/usr/bin/env bash
# odirect-cpu.sh — the io_uring server's CPU per write (and read) on an O_DIRECT block device.
#
#   benches/odirect-cpu.sh [--target-bin PATH] [--secs N] [--block-size 512|4096]
#
#   --target-bin  the server (default target/release/nvmeof-blocking-target; any build of it
#                 accepting --driver io-uring --file DEV works, e.g. one built from an older commit)
#   --secs        seconds per row (default 5)
#   --block-size  the volume's logical block size (default 4096)
#
# Serves a loop device over a file in /var/tmp (opened O_DIRECT, as a zvol is) with one io_uring
# worker on core 0, loads it with nvmf-perf on core 1 (4 KiB random writes at QD 32, 128 KiB
# sequential writes at QD 16, and the same reads), and prints IOPS and the server's CPU µs per I/O
# (utime + stime from /proc). Needs root (losetup). Figures are comparable within one run only.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/nvmeof-blocking-target; SECS=5; BS=4096
while [ $# -gt 0 ]; do case $1 in
  --target-bin) BIN=$2; shift 2 ;; --secs) SECS=$2; shift 2 ;; --block-size) BS=$2; shift 2 ;;
  -h|--help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0" | sed '$d'; exit 0 ;;
  *) echo "odirect-cpu.sh: unknown option $1" >&2; exit 2 ;; esac; done
[ -x target/release/nvmf-perf ] || cargo build --release -q -p xatastor-benches --bin nvmf-perf
[ -x "$BIN" ] || cargo build --release -q -p xatastor-examples --bin nvmeof-blocking-target
W=$(mktemp -d /var/tmp/odirect-cpu.XXXX)
LOOP=; PID=
# (Each step may fail without stopping the others: the server's exit status is a signal's.)
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  if [ -n "$LOOP" ]; then losetup -d "$LOOP" || true; fi
  rm -rf "$W"
}
trap cleanup EXIT
truncate -s 2G "$W/disk.img"
LOOP=$(losetup --find --show --direct-io=on --sector-size "$BS" "$W/disk.img")
NQN=nqn.2026-01.io.xatastor:odirect
taskset -c 0 "$BIN" --driver io-uring --workers 1 --listen 127.0.0.1:4590 --file "$LOOP" --block-size "$BS" \
  --allow-any-host --nqn "$NQN" >"$W/log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/4590) 2>/dev/null && break; sleep 0.1; done
ticks() { awk '{print $14+$15}' /proc/$PID/stat; }
hz=$(getconf CLK_TCK)
printf '%-24s %10s %14s\n' "O_DIRECT $LOOP" "IOPS" "CPU us/I/O"
for row in "randwrite 4096 32" "write 131072 16" "randread 4096 32" "read 131072 16"; do
  set -- $row
  t0=$(ticks)
  out=$(taskset -c 1 target/release/nvmf-perf --target 127.0.0.1:4590 --nqn "$NQN" --workload "$1" \
        --bs-bytes "$2" --qd "$3" --time-secs "$SECS" --warmup-secs 0 --range-mib 1024 --json)
  t1=$(ticks)
  iops=$(printf '%s' "$out" | python3 -c 'import json,sys; print(round(json.loads(sys.stdin.read())["iops"]))')
  cpu=$(python3 -c "print(round(($t1 - $t0) / $hz * 1e6 / max(1, $iops * $SECS), 2))")
  printf '%-24s %10s %14s\n' "$1 $(( $2 / 1024 ))K QD$3" "$iops" "$cpu"
done
