#!/usr/bin/env bash
# Throughput side by side: kaguard, nginx and HAProxy as reverse proxies in front of one fast
# upstream (nginx answering from memory with one worker), each with the same worker count and
# the same upstream keep-alive pool, driven by `wrk --latency`. Runs alternate between the
# proxies, ROUNDS times, and the medians and the ratios kaguard/nginx and kaguard/HAProxy are
# printed, plus the upstream served directly as the ceiling.
#
# The pool is large enough for every connection count, so no proxy closes and reopens upstream
# connections under load: nginx and kaguard keep up to KEEPALIVE idle upstream connections
# (nginx `keepalive $KEEPALIVE;`, kaguard `[[upstream]] keepalive = $KEEPALIVE` in a generated
# config) and send up to 100000 requests on each (`keepalive_requests 100000` in both); HAProxy
# runs `http-reuse safe` with no cap on idle connections (its default). The configs are in
# bench/lib.sh, shared with bench/idle.sh and bench/reuse.sh.
#
#   bench/throughput.sh                   # 1 and 2 workers, 64 and 256 connections, 3 sizes
#   QUICK=1 bench/throughput.sh           # 1 worker, 64 connections, small responses, 2 rounds
#   WORKERS="1" CONNS="64" SIZES="small" ROUNDS=5 DURATION=10 bench/throughput.sh
#
# Environment:
#   WORKERS="1 2"         worker processes (nginx) or threads (kaguard, HAProxy)
#   CONNS="64 256"        wrk connections (wrk -t1)
#   SIZES="small 16k 1m"  response bodies: 2 bytes, 16 KiB, 1 MiB
#   ROUNDS=3 DURATION=10  rounds per proxy, seconds per wrk run
#   QUICK=1               WORKERS=1 CONNS=64 SIZES=small ROUNDS=2 DURATION=5 (each overridable)
#   KEEPALIVE=512         idle upstream connections of nginx and kaguard; keep it >= CONNS
#   PGO=1                 kaguard built with profile-guided optimization (bench/pgo.sh), the
#                         build the README gives for production; PGO=0: `cargo build --release`
#   KEEP=1                keep the temporary directory with every log and wrk output
#
# Loopback only; every process it starts is stopped on exit. Needs root for apt-get when
# nginx, haproxy or wrk are missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

if [[ ${QUICK:-0} == 1 ]]; then
    : "${WORKERS:=1}" "${CONNS:=64}" "${SIZES:=small}" "${ROUNDS:=2}" "${DURATION:=5}"
fi
WORKERS=${WORKERS:-"1 2"}
CONNS=${CONNS:-"64 256"}
SIZES=${SIZES:-"small 16k 1m"}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
export PGO=${PGO:-1}

install_missing nginx haproxy wrk
need wrk
find_binaries
tmp=$(mktemp -d /tmp/kaguard-throughput.XXXXXX)
trap cleanup EXIT
build_kaguard "$root"
for conns in $CONNS; do
    ((conns <= KEEPALIVE)) ||
        say "warning: $conns connections > KEEPALIVE=$KEEPALIVE: nginx and kaguard will close and reopen upstream connections"
done

# The upstream: one nginx worker serving the three bodies from files (bench/lib.sh).
start_upstream "$tmp/up"

# cpu_ticks PID: "USER SYSTEM", the clock ticks PID and its child processes spent in user space
# and in the kernel, threads included. Kept apart because the kernel's part is most of a small
# request's cost and moves little from one proxy to another, so a change in user space shows
# in the user part long before it shows in the total (docs/performance.md).
cpu_ticks() {
    local user=0 system=0 p stat
    for p in $1 $(pgrep -P "$1" || true); do
        stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        # fields after the comm: state is 1st, utime 12th, stime 13th
        read -r -a f <<<"$stat"
        user=$((user + f[11]))
        system=$((system + f[12]))
    done
    echo "$user $system"
}

results="$tmp/results.tsv"
: >"$results"
# measure NAME WORKERS CONNS SIZE ROUND PORT PID
measure() {
    local name=$1 workers=$2 conns=$3 size=$4 round=$5 port=$6 pid=$7 out u0 s0 u1 s1
    out="$tmp/wrk-$name-$workers-$conns-$size-$round.txt"
    read -r u0 s0 <<<"$(cpu_ticks "$pid")"
    wrk -t1 -c"$conns" -d"${DURATION}s" --latency "http://127.0.0.1:$port/$size" >"$out" 2>&1 || true
    read -r u1 s1 <<<"$(cpu_ticks "$pid")"
    python3 "$here/wrk-summary.py" row "$out" "$name" "$workers" "$conns" "$size" "$round" \
        "$((u1 - u0))" "$((s1 - s0))" "$(getconf CLK_TCK)" >>"$results"
}

say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for workers in $WORKERS; do
    for round in $(seq 1 "$ROUNDS"); do
        for name in kaguard nginx haproxy; do
            start_proxy "$name" "$workers"
            for conns in $CONNS; do
                for size in $SIZES; do
                    say "round $round: $name, $workers worker(s), $conns connections, $size"
                    measure "$name" "$workers" "$conns" "$size" "$round" "$proxy_port" "$proxy_pid"
                done
            done
            stop "$proxy_pid" TERM
        done
        if [[ $workers == "${WORKERS%% *}" ]]; then
            for conns in $CONNS; do
                for size in $SIZES; do
                    measure upstream 1 "$conns" "$size" "$round" "$up_port" "$up_pid"
                done
            done
        fi
    done
done
python3 "$here/wrk-summary.py" table "$results"
if [[ $PGO == 1 ]]; then
    echo "kaguard: the profile-guided build of bench/pgo.sh (PGO=0: the plain release build)."
else
    echo "kaguard: the plain release build (PGO=1: the profile-guided build of bench/pgo.sh)."
fi
