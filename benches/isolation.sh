#!/usr/bin/env bash
# isolation.sh — does one tenant's heavy operation slow another tenant's reads on the same worker?
#
#   benches/isolation.sh [--target-bin PATH] [--secs N] [--dir DIR] [--serve-args "ARGS"]
#
#   --target-bin  the target (default target/release/xatastor-target)
#   --secs        seconds per measurement (default 10)
#   --dir         data directory on a file system WITHOUT fallocate zero-range (default: a directory
#                 under /dev/shm: tmpfs zeroes by writing zeros, like a zvol or an old file system)
#   --serve-args  more options for `xatastor-target serve` (e.g. "--disk-share 4")
#
# One `xatastor-target serve --backend file --workers 1` on core 0 with two 1 GiB volumes, `quiet`
# and `noisy`; the clients (this repository's nvmf-perf) on core 1. Measures the p50/p99/p99.9 latency
# of a QD1 4 KiB random read stream on `quiet`:
#   alone                       nothing else runs
#   + write zeroes              another host loops Write Zeroes of 32 MiB (QD1) over all of `noisy`:
#                               the device has no zero-range fallocate, so each one is a loop of
#                               zero writes in the backend
#   + QD128 reads               another connection keeps 128 random 4 KiB reads in flight on `noisy`
#   + cold activations          100 times a second a host connects to a volume that is not loaded
#                               (short nvmf-perf runs on volumes cold0, cold1, ...)
# and prints each p99 as a multiple of the quiet p99. Then it measures what the sharing costs two
# deep tenants: QD64 4 KiB random reads on `quiet` and `noisy` at once (two connections, both on
# core 1), reads/s of each; compare with --serve-args "--disk-share 0" (no sharing). The measured stream runs at real-time priority
# (it shares core 1 with the background client). Loopback only; figures are comparable within one
# run only.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/xatastor-target
SECS=10; DIR=; SERVE_ARGS=
while [ $# -gt 0 ]; do case $1 in
  --target-bin) BIN=$2; shift 2 ;; --secs) SECS=$2; shift 2 ;; --dir) DIR=$2; shift 2 ;;
  --serve-args) SERVE_ARGS=$2; shift 2 ;;
  -h|--help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0" | sed '$d'; exit 0 ;;
  *) echo "isolation.sh: unknown option $1" >&2; exit 2 ;; esac; done
[ -x "$BIN" ] || { echo "isolation.sh: no $BIN: cargo build --release first" >&2; exit 2; }
[ -x target/release/nvmf-perf ] || cargo build --release -q -p xatastor-benches --bin nvmf-perf
PERF=target/release/nvmf-perf
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:6f1c2b7e-isolation-bench
CLEAN_DIR=
if [ -z "$DIR" ]; then DIR=$(mktemp -d /dev/shm/xatastor-isolation.XXXX); CLEAN_DIR=$DIR; fi
PORT=4581
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; [ -n "$CLEAN_DIR" ] && rm -rf "$CLEAN_DIR"; }
trap cleanup EXIT

taskset -c 0 "$BIN" serve --listen 127.0.0.1:$PORT --data-dir "$DIR" --backend file --workers 1 \
  --metrics-listen off --log warn $SERVE_ARGS >"$DIR/serve.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do [ -S "$DIR/admin.sock" ] && (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
nqn() { "$BIN" --data-dir "$DIR" volume show "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nqn"])'; }
for v in quiet noisy; do "$BIN" --data-dir "$DIR" volume create $v --size 1GiB --allow-host "$HOSTNQN" >/dev/null; done
QUIET=$(nqn quiet); NOISY=$(nqn noisy)
perf() { taskset -c 1 "$PERF" --target 127.0.0.1:$PORT --hostnqn "$HOSTNQN" --json "$@"; }
# fill what the reads touch
perf --nqn "$QUIET" --workload write --qd 32 --bs-bytes 131072 --time-secs 2 --warmup-secs 0 >/dev/null

measure() { # label -> prints p50 p99 p99.9 of the quiet stream
  # The measured stream shares core 1 with the background client: it runs at real-time priority so
  # that what it measures is the target's delay, not the scheduling of the client core.
  RT=; chrt -f 10 true 2>/dev/null && RT="chrt -f 10"
  $RT taskset -c 1 "$PERF" --target 127.0.0.1:$PORT --hostnqn "$HOSTNQN" --json --nqn "$QUIET" --workload randread --qd 1 --bs-bytes 4096 --time-secs "$SECS" --warmup-secs 1 \
    | python3 -c 'import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); l=d["lat_us"]; print(l["p50"], l["p99"], l["p999"], d["iops"])'
}
declare -A P
P[alone]=$(measure)
perf --nqn "$NOISY" --workload writezeroes --qd 1 --bs-bytes 33554432 --time-secs $((SECS + 3)) --warmup-secs 0 \
  >"$DIR/wz.json" 2>&1 &
BG=$!; sleep 1
P[wz]=$(measure)
wait $BG || true
perf --nqn "$NOISY" --workload randread --qd 128 --bs-bytes 4096 --time-secs $((SECS + 3)) --warmup-secs 0 \
  >"$DIR/qd128.json" 2>&1 &
BG=$!; sleep 1
P[qd128]=$(measure)
wait $BG || true
# cold volumes: each is activated by the Connect of a short nvmf-perf run, COLD_RATE per second
COLD_RATE=100; COLD=$(( (SECS + 3) * COLD_RATE ))
"$BIN" --data-dir "$DIR" volume create-batch --prefix cold --count "$COLD" --size 16MiB --allow-host "$HOSTNQN" >/dev/null
(
  end=$(( $(date +%s) + SECS + 3 ))
  for i in $(seq 0 $((COLD - 1))); do
    [ "$(date +%s)" -ge "$end" ] && break
    perf --nqn "${QUIET%:quiet}:cold$i" --workload randread --qd 1 --bs-bytes 4096 --time-secs 0.01 \
      --warmup-secs 0 >/dev/null 2>>"$DIR/cold.err" &
    sleep "$(echo "scale=3; 1 / $COLD_RATE" | bc)"
  done
  wait
) &
BG=$!; sleep 1
P[cold]=$(measure)
wait $BG || true

# two deep tenants at once
DEEP=
for v in QUIET NOISY; do
  perf --nqn "${!v}" --workload randread --qd 64 --bs-bytes 4096 --time-secs "$SECS" --warmup-secs 1 \
    >"$DIR/deep-$v.json" 2>&1 &
  DEEP="$DEEP $!"
done
wait $DEEP || true

printf '%-34s %10s %10s %10s %10s %12s\n' "QD1 4K randread on quiet" "p50 us" "p99 us" "p99.9 us" "IOPS" "p99 / alone"
base=$(echo "${P[alone]}" | awk '{print $2}')
for k in alone:alone wz:"+ write zeroes 32M loop" qd128:"+ QD128 reads (other conn)" cold:"+ 100 cold activations/s"; do
  t=${k%%:*}; n=${k#*:}
  set -- ${P[$t]}
  printf '%-34s %10s %10s %10s %10s %11sx\n' "$n" "$1" "$2" "$3" "$4" "$(echo "scale=2; $2 / $base" | bc)"
done
python3 - "$DIR/wz.json" "$DIR/qd128.json" "$DIR/deep-QUIET.json" "$DIR/deep-NOISY.json" <<'EOF'
import json, sys
for path, what in zip(sys.argv[1:], ["background write zeroes 32 MiB", "background QD128 reads", "two deep tenants at once: QD64 reads on quiet", "two deep tenants at once: QD64 reads on noisy"]):
    try:
        d = json.loads(open(path).read().strip().splitlines()[-1])
        print(f"{what}: {d['iops']:.0f} ops/s, p99 {d['lat_us']['p99']:.0f} us, errors {d['errors']}")
    except Exception as e:
        print(f"{what}: no result ({e})")
EOF
