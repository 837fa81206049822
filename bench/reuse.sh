#!/usr/bin/env bash
# Upstream connection reuse under steady load: wrk -t1 -c$CONNS -d${DURATION}s through kaguard,
# then through nginx, each in front of a fresh nginx upstream whose access log records
# `$connection $connection_requests` for every request. From each log: the requests the upstream
# served, the distinct connections they came on, and the share of requests sent on a reused
# connection (connection_requests > 1). The proxies run the configs of bench/throughput.sh
# (bench/lib.sh): KEEPALIVE idle upstream connections, keepalive_requests 100000.
#
#   bench/reuse.sh                           # 64 connections, 10 s per proxy
#   DURATION=3 bench/reuse.sh                # quicker
#   CONNS=256 PROXIES="kaguard nginx haproxy" bench/reuse.sh
#
# Environment:
#   DURATION=10        seconds of wrk per proxy
#   CONNS=64           wrk connections (wrk -t1); keep it <= KEEPALIVE
#   WORKERS=1          proxy workers
#   PROXIES="kaguard nginx"   in this order; haproxy works too
#   KEEPALIVE=512      idle upstream connections nginx and kaguard keep
#   KEEP=1             keep the temporary directory with every log
#
# The share is printed with 3 decimals (99.900 % and 99.990 % differ by 10x in new connections),
# and the requests that opened a connection are printed as a count. Requests/s are not printed:
# the upstream writes a log line per request, so this is no throughput measurement (see
# bench/throughput.sh). Loopback only; every process it starts is stopped on exit; wrk is bounded
# by `timeout`. Needs root for apt-get when nginx or wrk are missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-1}
PROXIES=${PROXIES:-"kaguard nginx"}
[[ $DURATION =~ ^[1-9][0-9]*$ && $CONNS =~ ^[1-9][0-9]*$ ]] ||
    die "DURATION and CONNS must be positive integers"
((CONNS <= KEEPALIVE)) ||
    say "warning: CONNS=$CONNS > KEEPALIVE=$KEEPALIVE: nginx and kaguard will close and reopen upstream connections"

need python3
need timeout
install_missing nginx wrk
[[ " $PROXIES " != *" haproxy "* ]] || install_missing haproxy
find_binaries
tmp=$(mktemp -d /tmp/kaguard-reuse.XXXXXX)
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
build_kaguard "$root"

results="$tmp/results.tsv"
: >"$results"
# run NAME: a fresh upstream with its log, the proxy, wrk; appends one row to $results.
run() {
    local name=$1 up_dir="$tmp/up-$1" out="$tmp/wrk-$1.txt" rc=0 wrk_pid client errors
    start_upstream "$up_dir" log
    start_proxy "$name" "$WORKERS"
    say "$name: wrk -t1 -c$CONNS -d${DURATION}s"
    # In the background and waited for, so that a signal to this script ends the run at once.
    timeout $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"${DURATION}s" \
        "http://127.0.0.1:$proxy_port/small" >"$out" 2>&1 &
    wrk_pid=$!
    pids+=("$wrk_pid")
    wait "$wrk_pid" || rc=$?
    forget "$wrk_pid"
    ((rc == 0)) || die "$name: wrk failed (exit $rc): $(cat "$out")"
    # The proxy first, so that the upstream sees no more requests; then the upstream, whose
    # graceful exit (QUIT) writes out its buffered log.
    stop "$proxy_pid" TERM
    stop "$up_pid" QUIT
    client=$(sed -n 's/^ *\([0-9]*\) requests in .*/\1/p' "$out")
    errors=$( (grep -E 'Non-2xx|Socket errors' "$out" || true) | xargs | tr ' ' '_')
    awk -v name="$name" -v client="${client:-0}" -v errors="${errors:--}" '
        { requests++; if (!($1 in seen)) { seen[$1] = 1; conns++ } if ($2 > 1) reused++ }
        END { printf "%s\t%d\t%d\t%d\t%d\t%s\n", name, client, requests, conns, reused, errors }' \
        "$up_dir/access.log" >>"$results"
}

say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for name in $PROXIES; do
    run "$name"
done

echo
echo "Upstream connection reuse: wrk -t1 -c$CONNS -d${DURATION}s GET /small (2-byte body), $WORKERS proxy worker(s)"
pool="Upstream pool: KEEPALIVE=$KEEPALIVE idle connections (nginx keepalive, kaguard keepalive), keepalive_requests 100000 in both"
[[ " $PROXIES " != *" haproxy "* ]] || pool+="; HAProxy http-reuse safe, no idle cap"
echo "$pool"
echo
awk -F'\t' '
    BEGIN {
        print "| proxy | client requests | upstream requests | upstream conns | reused | requests on a new conn |"
        print "|---|---|---|---|---|---|"
    }
    { share = $3 > 0 ? 100 * $5 / $3 : 0
      printf "| %s | %d | %d | %d | %.3f %% | %d |\n", $1, $2, $3, $4, share, $3 - $5
      if ($6 != "-") notes = notes sprintf("note %s: wrk reported %s\n", $1, $6)
      if ($3 < $2) notes = notes sprintf("note %s: the upstream logged fewer requests than wrk completed\n", $1) }
    END { printf "%s", notes }' "$results"
echo
echo "reused: upstream requests whose \$connection_requests > 1, over all upstream requests (the upstream's access log)."
