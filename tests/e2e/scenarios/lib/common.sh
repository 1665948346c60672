# Basic helpers of every suite (included by run.sh through '# e2e-include: lib/common.sh'; use the
# including script's STATE and RESULTS, and E2E_SCENARIO, set by the runner).

# Seconds since the guest booted.
now() { cut -d' ' -f1 /proc/uptime; }
log() { echo "--- [$(now)s] $*"; }
# Run a command, echoing it first; its output goes to the console.
x() { echo "+ $*"; "$@"; }
# Record why the current scenario fails (first reason wins) and leave it.
fail() { [[ -e $STATE/reason ]] || echo "$*" > "$STATE/reason"; exit 1; }
# A measurement: an INFO line in the results (repeated in run.sh's summary).
info() { log "INFO $E2E_SCENARIO $*"; echo "INFO $E2E_SCENARIO $*" > "$RESULTS"; }
# Seconds (one decimal) since the uptime $1.
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
# Bytes $1 as "N.N MiB".
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
