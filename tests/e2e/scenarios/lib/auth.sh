# shellcheck shell=bash
# NVMe in-band authentication (DH-HMAC-CHAP) helpers for the Linux host, included by run.sh
# through '# e2e-include: lib/auth.sh' (after lib/common.sh and lib/nvme.sh; uses x/fail/log,
# STATE, need_nvme_tcp, ns_dev_of and ctrls_of). They need a guest kernel with
# CONFIG_NVME_HOST_AUTH (run.sh --kernel 6.12; Debian 12's 6.1 has none) and nvme-cli >= 2.0
# (the image has Debian 12's 2.3).
#
# Secrets are in the DHHC-1 representation (NVMe base specification 2.x, "Secret representation"):
#   DHHC-1:HH:BASE64:
# HH says how the secret was made: 00 used as is, 01/02/03 transformed with SHA-256/384/512
# (then its length must be 32/48/64 bytes); BASE64 encodes the key (32, 48 or 64 bytes) followed
# by the CRC-32 of the key, little-endian.

# need_nvme_auth: the guest kernel can authenticate as a host (fails the scenario otherwise).
need_nvme_auth() {
    need_nvme_tcp
    local cfg
    cfg=/boot/config-$(uname -r)
    if [[ -r $cfg ]] && ! grep -qx 'CONFIG_NVME_HOST_AUTH=y' "$cfg"; then
        fail "guest kernel $(uname -r) has no NVMe host authentication (CONFIG_NVME_HOST_AUTH unset): run with --kernel 6.12"
    fi
}

# dhchap_key_check KEY [HMAC]: why KEY is not a well-formed DHHC-1 secret (empty output and
# status 0 if it is): the layout, the HMAC indicator (HMAC: 0-3, if given), the key length
# (32/48/64, and the hash length for a transformed key) and the CRC-32 over the key, checked
# independently of nvme-cli (python3's zlib), then `nvme check-dhchap-key` must accept it too.
dhchap_key_check() {
    local key=$1 want_hmac=${2:-} why
    why=$(python3 - "$key" "$want_hmac" <<'PY'
import base64, binascii, re, sys, zlib
key, want = sys.argv[1], sys.argv[2]
m = re.fullmatch(r"DHHC-1:(0[0-3]):([A-Za-z0-9+/]+={0,2}):", key)
if not m:
    sys.exit("not of the form DHHC-1:0[0-3]:<base64>:")
hmac = int(m.group(1))
if want != "" and hmac != int(want):
    sys.exit(f"HMAC indicator {hmac:02d}, expected {int(want):02d}")
try:
    raw = base64.b64decode(m.group(2), validate=True)
except binascii.Error as e:
    sys.exit(f"bad base64: {e}")
k, crc = raw[:-4], raw[-4:]
if len(k) not in (32, 48, 64):
    sys.exit(f"key of {len(k)} bytes (32, 48 or 64 expected)")
if hmac and len(k) != {1: 32, 2: 48, 3: 64}[hmac]:
    sys.exit(f"transformed key (HMAC {hmac:02d}) of {len(k)} bytes")
if zlib.crc32(k).to_bytes(4, "little") != crc:
    sys.exit(f"CRC-32 {crc.hex()} does not match the key's {zlib.crc32(k).to_bytes(4, 'little').hex()}")
PY
    ) 2>&1 || { echo "${why:-python3 failed}"; return 1; }
    if ! why=$(nvme check-dhchap-key --key="$key" 2>&1); then
        echo "nvme check-dhchap-key refuses it: $(tr '\n' ' ' <<<"$why")"
        return 1
    fi
    return 0
}

# dhchap_gen_key HMAC LEN [NQN]: a new secret from `nvme gen-dhchap-key` (HMAC 0: used as is;
# 1-3: transformed with NQN), checked with dhchap_key_check; prints it.
dhchap_gen_key() {
    local hmac=$1 len=$2 nqn=${3:-} key why
    key=$(nvme gen-dhchap-key --hmac="$hmac" --key-length="$len" ${nqn:+--nqn="$nqn"} 2>&1) \
        || fail "nvme gen-dhchap-key --hmac=$hmac --key-length=$len failed: $key"
    why=$(dhchap_key_check "$key" "$hmac") || fail "nvme gen-dhchap-key --hmac=$hmac --key-length=$len gave a bad secret '$key': $why"
    echo "$key"
}

# dhchap_expected HEX: the DHHC-1 representation of the raw key HEX used as is (HMAC 00),
# computed here (base64 of key + CRC-32 LE), for comparison with nvme-cli's.
dhchap_expected() {
    python3 -c 'import base64, sys, zlib; k = bytes.fromhex(sys.argv[1]); print("DHHC-1:00:" + base64.b64encode(k + zlib.crc32(k).to_bytes(4, "little")).decode() + ":")' "$1"
}

# The controllers of subsystem NQN that host HOSTNQN holds (one per line).
ctrls_of_host() {
    local c
    for c in $(ctrls_of "$1"); do
        [[ $(cat "/sys/class/nvme/$c/hostnqn" 2>/dev/null) == "$2" ]] && echo "$c"
    done
    return 0
}

# auth_connect ADDR PORT NQN HOSTNQN HOSTID [nvme-connect options, e.g. --dhchap-secret=KEY
# --dhchap-ctrl-secret=KEY]: connect as that host, wait for the namespace block device; prints
# its name. (The kernel keeps host NQN and host ID one-to-one, so a second host identity needs
# its own ID.)
auth_connect() {
    local addr=$1 port=$2 nqn=$3 hostnqn=$4 hostid=$5 d rc
    shift 5
    need_nvme_tcp
    x timeout 60 nvme connect -t tcp -a "$addr" -s "$port" -n "$nqn" --hostnqn "$hostnqn" --hostid "$hostid" \
        --ctrl-loss-tmo=20 --reconnect-delay=2 "$@" >&2 \
        || { rc=$?; fail "nvme connect to $nqn as $hostnqn $(auth_opts_shown "$@") failed (rc=$rc): $(dmesg | grep -i nvme | grep -v 'nvme_auth\|shared secret' | tail -n 2 | tr '\n' ' ')"; }
    for _ in $(seq 1 150); do
        if d=$(ns_dev_of "$nqn"); then echo "$d"; return 0; fi
        sleep 0.2
    done
    fail "no namespace block device 30s after connecting to $nqn as $hostnqn"
}

# auth_connect_refused ADDR PORT NQN HOSTNQN HOSTID [options]: nvme connect must fail by a
# refusal (not by its 60 s timeout) and leave no controller of that host behind. Prints the
# kernel's messages about it.
auth_connect_refused() {
    local addr=$1 port=$2 nqn=$3 hostnqn=$4 hostid=$5 rc mark c leaked
    shift 5
    need_nvme_tcp
    mark=$(dmesg | wc -l)
    x timeout 60 nvme connect -t tcp -a "$addr" -s "$port" -n "$nqn" --hostnqn "$hostnqn" --hostid "$hostid" \
        --ctrl-loss-tmo=20 --reconnect-delay=2 "$@" >&2
    rc=$?
    log "nvme connect $(auth_opts_shown "$@") exited rc=$rc; kernel says:" >&2
    dmesg | tail -n +"$(( mark + 1 ))" | grep -iE 'nvme|auth' >&2
    leaked=$(ctrls_of_host "$nqn" "$hostnqn" | tr '\n' ' ')
    if [[ -n $leaked ]]; then
        for c in $leaked; do echo 1 > "/sys/class/nvme/$c/delete_controller" 2>/dev/null; done
        fail "nvme connect $(auth_opts_shown "$@") was let in (controller(s) $leaked, rc=$rc)"
    fi
    [[ $rc != 0 ]] || fail "nvme connect $(auth_opts_shown "$@") succeeded (rc=0) without a controller"
    [[ $rc != 124 ]] || fail "nvme connect $(auth_opts_shown "$@") timed out instead of being refused"
    return 0
}

# The options of a connect as a failure reason shows them: a secret by its first characters only.
auth_opts_shown() {
    local o v out=""
    for o in "$@"; do
        case $o in
            --dhchap-secret=*|--dhchap-ctrl-secret=*) v=${o#*=}; out+="${o%%=*}=${v:0:14}... " ;;
            *) out+="$o " ;;
        esac
    done
    [[ -n $out ]] || out="(no secret)"
    echo "${out% }"
}

# dmesg_since MARK: the kernel messages after dmesg line MARK (for grep -q on a here-string: in a
# pipeline, grep -q ending early would fail it under pipefail).
dmesg_since() { dmesg | tail -n +"$(( $1 + 1 ))"; }

# auth_dmesg_result MARK: the host's "authenticated with hash H dhgroup G" line for the admin
# queue since dmesg line MARK (empty if there is none).
auth_dmesg_result() {
    dmesg | tail -n +"$(( $1 + 1 ))" | grep -o 'qid 0: authenticated with hash [^ ]* dhgroup [^ ]*' | tail -n1
}
