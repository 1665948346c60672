#!/usr/bin/env bash
# Runs nvmf-perf against a target on loopback and prints one table: 4 KiB random read and write at
# QD 1, 32 and 128 with 1 and 2 connections, 128 KiB sequential read and write, memory-backed volume,
# plus the target's CPU seconds per million I/Os (utime + stime from /proc/PID/stat).
#
# Usage: benches/perf-table.sh [--target-bin PATH] [--driver blocking|io-uring] [--workers N]
#                              [--time SECS] [--warmup SECS]
#   --target-bin  the server to measure (default: target/release/nvmeof-blocking-target); it must
#                 accept --listen ADDR --memory SIZE --allow-any-host --nqn NQN and print
#                 "serving ... on ADDR" on stderr
#   --driver      passed to the target (default io-uring: xatastor-core's server)
#   --workers     io_uring server workers (default 1, leaving a core to the load generator)
#   --time        seconds measured per row (default 5)
#   --warmup      seconds of warm-up per row (default 1)
# Note: the load generator and the target share this machine's cores; say so with the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_BIN=target/release/nvmeof-blocking-target
TIME=5
WARMUP=1
DRIVER=io-uring
WORKERS=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --target-bin) TARGET_BIN="$2"; shift 2 ;;
        --time) TIME="$2"; shift 2 ;;
        --driver) DRIVER="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0" | sed '$d'; exit 0 ;;
        *) echo "perf-table.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
cargo build --release -q -p xatastor-benches --bin nvmf-perf -p xatastor-examples
NQN="nqn.2026-01.io.xatastor:perf"
LOG=$(mktemp)
"$TARGET_BIN" --driver "$DRIVER" --workers "$WORKERS" --listen 127.0.0.1:0 --memory 4GiB --allow-any-host \
    --nqn "$NQN" --log warn 2>"$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -f "$LOG"' EXIT
ADDR=""
for _ in $(seq 100); do
    ADDR=$(sed -n 's/.* on \([0-9.]*:[0-9]*\)$/\1/p' "$LOG" | head -1)
    [[ -n $ADDR ]] && break
    sleep 0.05
done
[[ -n $ADDR ]] || { echo "the target did not start:"; cat "$LOG"; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
HZ=$(getconf CLK_TCK)

printf '%-12s %6s %5s %4s %10s %9s %8s %8s %8s %9s\n' workload bs conns qd IOPS MiB/s p50us p99us p99.9us cpu-s/M-IO
row() { # workload bs conns qd
    local before after out
    before=$(cpu_ticks)
    out=$(target/release/nvmf-perf --target "$ADDR" --nqn "$NQN" --workload "$1" --bs "$2" --queues "$3" \
        --qd "$4" --time "$TIME" --warmup "$WARMUP" --range-mib 1024 --json)
    after=$(cpu_ticks)
    python3 - "$out" "$before" "$after" "$HZ" "$TIME" "$WARMUP" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); before, after, hz = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t, w = float(sys.argv[5]), float(sys.argv[6])
# CPU over warm-up + measurement, I/Os estimated over the same span from the measured rate.
ios = r["iops"] * (t + w)
cpu = (after - before) / hz
per_m = cpu / (ios / 1e6) if ios else float("nan")
l = r["lat_us"]
print(f'{r["workload"].lower():<12} {r["bs"]:>6} {r["queues"]:>5} {r["qd"]:>4} {r["iops"]:>10.0f} {r["mib_s"]:>9.1f} {l["p50"]:>8.1f} {l["p99"]:>8.1f} {l["p999"]:>8.1f} {per_m:>9.2f}')
PY
}
for wl in randread randwrite; do
    for conns in 1 2; do
        for qd in 1 32 128; do
            row $wl 4096 $conns $qd
        done
    done
done
row read 131072 1 16
row write 131072 1 16
echo "(target: $TARGET_BIN --driver $DRIVER --workers $WORKERS; $(nproc) cores shared by target and load generator; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
