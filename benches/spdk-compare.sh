#!/usr/bin/env bash
# spdk-compare.sh — xatastor-target against SPDK's NVMe/TCP target, same machine, same client, same run.
#
#   benches/spdk-compare.sh [--spdk DIR] [--target-bin PATH] [--secs N] [--workers N] [--runs N]
#                           [--client spdk|nvmf-perf]
#
#   --spdk        directory with SPDK's bin/nvmf_tgt, bin/spdk_nvme_perf and bin/rpc.py
#                 (default: ../shared/anchors/spdk-v24.01 next to the repository), or `none`: our
#                 target alone, under nvmf-perf (for machines SPDK's binaries do not run on)
#   --target-bin  our target (default target/release/xatastor-target)
#   --secs        seconds per measured row (default 8)
#   --workers     our target's io_uring workers (default 1: the same one core SPDK gets)
#   --runs        how many times to run the whole comparison (default 1; each run prints a table)
#   --client      the load generator: SPDK's own initiator (default; polling, core 1), or this
#                 repository's nvmf-perf (core 1; its latency column is the median, not the average;
#                 the default with --spdk none)
#
# Both targets run on core 0 (SPDK: nvmf_tgt with a 1 GiB malloc bdev; ours: `xatastor-target serve
# --backend memory --workers 1` with a 1 GiB volume), the client on core 1, each target first filled
# by a sequential write. Rows: 4 KiB random read and write at QD 32, 4 KiB random read at QD 1
# (IOPS, average latency, the target's CPU per I/O in that row), 128 KiB sequential read and write
# at QD 16 (MiB/s); then the target's CPU seconds over all rows and CPU per I/O, and its idle CPU
# (% of a core over 5 s, one second after the load). Loopback only. Figures are comparable within
# one run only: the machine is shared.
#
# The same measurement as ../shared/anchors/spdk-v24.01/compare.sh, with the 128 KiB rows added.
set -euo pipefail
cd "$(dirname "$0")/.."
SPDK=$(cd .. && pwd)/shared/anchors/spdk-v24.01
BIN=target/release/xatastor-target
SECS=8; WORKERS=1; RUNS=1; CLIENT=spdk
while [ $# -gt 0 ]; do case $1 in
  --spdk) SPDK=$2; shift 2 ;; --target-bin) BIN=$2; shift 2 ;; --secs) SECS=$2; shift 2 ;;
  --workers) WORKERS=$2; shift 2 ;; --runs) RUNS=$2; shift 2 ;; --client) CLIENT=$2; shift 2 ;;
  -h|--help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0" | sed '$d'; exit 0 ;;
  *) echo "spdk-compare.sh: unknown option $1" >&2; exit 2 ;; esac; done
[ -x "$BIN" ] || { echo "spdk-compare.sh: no $BIN: cargo build --release first" >&2; exit 2; }
if [ "$SPDK" = none ]; then
  [ "$CLIENT" = spdk ] && CLIENT=nvmf-perf
  [ "$CLIENT" = nvmf-perf ] || { echo "spdk-compare.sh: --spdk none runs under nvmf-perf" >&2; exit 2; }
else
  [ -x "$SPDK/bin/nvmf_tgt" ] || { echo "spdk-compare.sh: no SPDK at $SPDK (--spdk DIR, or --spdk none)" >&2; exit 2; }
fi
# nvmf-perf loads for a second before it measures: the target's CPU time covers that second too, so
# a row's I/Os are counted as its rate times (secs + WARM).
WARM=0; [ "$CLIENT" = nvmf-perf ] && WARM=1
case $CLIENT in
  spdk) ;;
  nvmf-perf) [ -x target/release/nvmf-perf ] || cargo build --release -q -p xatastor-benches --bin nvmf-perf ;;
  *) echo "spdk-compare.sh: --client spdk|nvmf-perf" >&2; exit 2 ;;
esac
for lib in libnuma.so.1 libaio.so.1 libssl.so.3 libuuid.so.1; do
  ldconfig -p | grep -q "$lib" || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnuma1 libaio1 libssl3 libuuid1 >/dev/null; break; }
done
command -v bc >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bc >/dev/null; }
# SPDK's binaries are built for one CPU (-march=native): on another one they die at once with an
# illegal instruction (status 132), which would otherwise show up as a failed RPC.
if [ "$SPDK" != none ]; then
  for b in nvmf_tgt $([ "$CLIENT" = spdk ] && echo spdk_nvme_perf); do
    rc=0; bash -c '"$0" --help >/dev/null 2>&1' "$SPDK/bin/$b" 2>/dev/null || rc=$?
    if [ "$rc" -ge 128 ]; then
      echo "spdk-compare.sh: $SPDK/bin/$b dies with signal $((rc - 128)) on this CPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); SPDK's binaries were built for another CPU: rebuild them here, or measure our target alone with --spdk none" >&2
      exit 2
    fi
  done
fi
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:5bd6b8a4-0f6c-4a3a-9d1e-2f7c8e1d0b11
W=$(mktemp -d /var/tmp/spdk-compare.XXXX)
SPID=; OPID=
cleanup() { [ -n "$SPID" ] && kill "$SPID" 2>/dev/null; [ -n "$OPID" ] && kill "$OPID" 2>/dev/null; sleep 1
            rm -rf "$W" /var/run/dpdk/spdk71 /var/run/dpdk/spdk72; }
trap cleanup EXIT

cpu_of() { awk -v t="$(getconf CLK_TCK)" '{printf "%.3f", ($14+$15)/t}' /proc/$1/stat; }
# load PORT NQN WORKLOAD QD BS SECS -> "IOPS MIBS AVG_US"
load() {
  local out line
  if [ "$CLIENT" = spdk ]; then
    out=$(taskset -c 1 "$SPDK/bin/spdk_nvme_perf" -q "$4" -o "$5" -w "$3" -t "$6" -c 0x2 -i 71 --no-huge -s 512 \
          -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$1 subnqn:$2 hostnqn:$HOSTNQN" 2>&1) || true
    line=$(printf '%s\n' "$out" | grep -E '^Total *:' | tail -1)
    [ -n "$line" ] || { printf '%s\n' "$out" | tail -3 >&2; echo "0 0 0"; return; }
    echo "$line" | awk '{print $3, $4, $5}'
  else
    out=$(taskset -c 1 target/release/nvmf-perf --target "127.0.0.1:$1" --nqn "$2" --hostnqn "$HOSTNQN" \
          --workload "$3" --qd "$4" --bs-bytes "$5" --time-secs "$6" --warmup-secs "$WARM" --range-mib 1024 --json 2>&1) || true
    printf '%s\n' "$out" | python3 -c 'import json,sys
try:
    d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(d["iops"], d["mib_s"], d["lat_us"]["p50"])
except Exception: print("0 0 0")'
  fi
}
declare -A R
suite() { # tag port nqn pid
  load "$2" "$3" write 32 4096 4 >/dev/null
  local c0 c1 r0 r1 ios; c0=$(cpu_of "$4")
  for row in rr:randread:32:4096 rw:randwrite:32:4096 q1:randread:1:4096 sr:read:16:131072 sw:write:16:131072; do
    IFS=: read -r k wl qd bs <<<"$row"
    r0=$(cpu_of "$4")
    R[$1.$k]=$(load "$2" "$3" "$wl" "$qd" "$bs" "$SECS")
    r1=$(cpu_of "$4")
    # This row's CPU per I/O, in µs (+1 I/O: a failed row counts 0).
    R[$1.cpuio.$k]=$(echo "scale=3; ($r1 - $r0) * 1000000 / (${R[$1.$k]%% *} * ($SECS + $WARM) + 1)" | bc)
  done
  c1=$(cpu_of "$4"); R[$1.cpu]=$(echo "$c1 - $c0" | bc)
  ios=0; for k in rr rw q1 sr sw; do ios=$(echo "$ios + ${R[$1.$k]%% *} * ($SECS + $WARM)" | bc); done
  R[$1.cpuio]=$(echo "scale=3; ${R[$1.cpu]} * 1000000 / $ios" | bc)
  sleep 1; c0=$(cpu_of "$4"); sleep 5; c1=$(cpu_of "$4"); R[$1.idle]=$(echo "($c1 - $c0) * 20" | bc)
}

one_run() {
  [ "$SPDK" = none ] || spdk_suite
  ours_suite
  print_table
}

spdk_suite() {
  local RPC="python3 $SPDK/bin/rpc.py -s $W/spdk.sock"
  setsid taskset -c 0 "$SPDK/bin/nvmf_tgt" -m 0x1 -i 72 --no-huge -s 2048 -r "$W/spdk.sock" >"$W/spdk.log" 2>&1 </dev/null &
  SPID=$!
  for _ in $(seq 1 100); do [ -S "$W/spdk.sock" ] && break; sleep 0.1; done; sleep 1
  $RPC nvmf_create_transport -t TCP -u 8192 -c 4096 -i 131072 -q 128 >/dev/null
  $RPC bdev_malloc_create 1024 4096 -b M0 >/dev/null
  $RPC nvmf_create_subsystem nqn.2016-06.io.spdk:compare -a -s SPDKCMP >/dev/null
  $RPC nvmf_subsystem_add_ns nqn.2016-06.io.spdk:compare M0 >/dev/null
  $RPC nvmf_subsystem_add_listener nqn.2016-06.io.spdk:compare -t tcp -a 127.0.0.1 -s 4571 >/dev/null
  suite spdk 4571 nqn.2016-06.io.spdk:compare "$SPID"
  kill "$SPID"; wait "$SPID" 2>/dev/null || true; SPID=
  rm -f "$W/spdk.sock"
}

ours_suite() {
  rm -rf "$W/ours"; mkdir -p "$W/ours"
  taskset -c 0 "$BIN" serve --listen 127.0.0.1:4572 --data-dir "$W/ours" --backend memory --workers "$WORKERS" \
    --metrics-listen off --log warn >"$W/ours.log" 2>&1 &
  OPID=$!
  for _ in $(seq 1 100); do [ -S "$W/ours/admin.sock" ] && (exec 3<>/dev/tcp/127.0.0.1/4572) 2>/dev/null && break; sleep 0.1; done
  "$BIN" --data-dir "$W/ours" volume create cmp --size 1GiB --allow-host "$HOSTNQN" >/dev/null
  local NQN; NQN=$("$BIN" --data-dir "$W/ours" volume show cmp --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nqn"])')
  suite ours 4572 "$NQN" "$OPID"
  kill "$OPID"; wait "$OPID" 2>/dev/null || true; OPID=
}

print_table() {
  # field KEY N: the Nth number of a result ("-" without SPDK); row LABEL SPDK OURS [RATIO?]
  field() { if [ -n "${R[$1]:-}" ]; then echo "${R[$1]}" | awk -v n="$2" '{print $n}'; else echo -; fi; }
  row() {
    local ratio=
    if [ -n "${4:-}" ]; then
      ratio=-; [ "$2" != - ] && [ "$(echo "$2 > 0" | bc)" = 1 ] && ratio="$(echo "scale=2; $3 / $2" | bc)x"
    fi
    printf '%-28s %14s %14s %9s\n' "$1" "$2" "$3" "$ratio"
  }
  printf '%-28s %14s %14s %9s\n' "client: $CLIENT" "SPDK v24.01" "ours" "ours/SPDK"
  for k in rr:4K-randread-QD32 rw:4K-randwrite-QD32 q1:4K-randread-QD1; do
    t=${k%%:*}; n=${k#*:}
    row "$n IOPS" "$(field spdk.$t 1)" "$(field ours.$t 1)" ratio
    row "  avg latency us" "$(field spdk.$t 3)" "$(field ours.$t 3)"
    row "  CPU us per I/O" "$(field spdk.cpuio.$t 1)" "$(field ours.cpuio.$t 1)" ratio
  done
  for k in sr:128K-read-QD16 sw:128K-write-QD16; do
    t=${k%%:*}; n=${k#*:}
    row "$n MiB/s" "$(field spdk.$t 2)" "$(field ours.$t 2)" ratio
  done
  row "target CPU s (all rows)" "$(field spdk.cpu 1)" "$(field ours.cpu 1)"
  row "target CPU us per I/O" "$(field spdk.cpuio 1)" "$(field ours.cpuio 1)" ratio
  row "idle CPU % of a core" "$(field spdk.idle 1)" "$(field ours.idle 1)"
}

for run in $(seq 1 "$RUNS"); do
  [ "$RUNS" -gt 1 ] && echo "== run $run of $RUNS ($(date -u +%H:%M:%S))"
  one_run
done
