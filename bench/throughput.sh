#!/usr/bin/env bash
# Throughput side by side: kaguard, nginx and HAProxy as reverse proxies in front of one fast
# upstream (nginx answering from memory with one worker), each with the same worker count and
# an upstream keep-alive pool of 32, driven by `wrk --latency`. Runs alternate between the
# proxies, ROUNDS times, and the medians and the ratios kaguard/nginx and kaguard/HAProxy are
# printed, plus the upstream served directly as the ceiling.
#
#   bench/throughput.sh                   # 1 and 2 workers, 64 and 256 connections, 3 sizes
#   QUICK=1 bench/throughput.sh           # 1 worker, 64 connections, small responses, 2 rounds
#   WORKERS="1" CONNS="64" SIZES="small" ROUNDS=5 DURATION=10 bench/throughput.sh
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

install_missing() {
    local missing=()
    [[ -n $(find_nginx) ]] || missing+=(nginx)
    command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    if ((${#missing[@]})); then
        say "installing ${missing[*]} from Debian's packages"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_missing
need wrk
nginx_bin=$(find_nginx)
haproxy_bin=$(command -v haproxy || echo /usr/sbin/haproxy)
say "building kaguard (release)"
(cd "$root" && cargo build --release --quiet)
tmp=$(mktemp -d /tmp/kaguard-throughput.XXXXXX)
trap cleanup EXIT
cp "$root/target/release/kaguard" "$tmp/kaguard"

# The upstream: one nginx worker serving the three bodies from memory-backed files.
up_port=$(free_port)
mkdir -p "$tmp/up/www" "$tmp/up/logs"
printf 'OK' >"$tmp/up/www/small"
head -c 16384 /dev/zero | tr '\0' 'x' >"$tmp/up/www/16k"
head -c 1048576 /dev/zero | tr '\0' 'x' >"$tmp/up/www/1m"
# mktemp makes the directory private; nginx's workers run as another user and must read it.
chmod -R a+rX "$tmp"
cat >"$tmp/up/nginx.conf" <<CONF
worker_processes 1;
pid $tmp/up/nginx.pid;
error_log $tmp/up/logs/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000;
    server {
        listen 127.0.0.1:$up_port;
        root $tmp/up/www;
        location = /small { default_type text/plain; }
        location = /16k { default_type text/plain; }
        location = /1m { default_type text/plain; }
    }
}
CONF
start "$tmp/up/run.log" "$nginx_bin" -p "$tmp/up/" -c "$tmp/up/nginx.conf" -g 'daemon off;'
up_pid=$last_pid
wait_for_port "$up_port" "$up_pid" "$tmp/up/run.log"

# Proxy configs, the same pool for all: 32 idle upstream connections, HTTP/1.1 keep-alive.
nginx_proxy_conf() { # workers port dir
    cat <<CONF
worker_processes $1;
pid $3/nginx.pid;
error_log $3/error.log;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 100000;
    upstream u { server 127.0.0.1:$up_port; keepalive 32; keepalive_requests 100000; }
    server {
        listen 127.0.0.1:$2;
        location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
}

haproxy_conf() { # workers port
    cat <<CONF
global
    nbthread $1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend f
    bind 127.0.0.1:$2
    default_backend b
backend b
    http-reuse safe
    server s1 127.0.0.1:$up_port maxconn 10000
CONF
}

# start_proxy NAME WORKERS: starts it; sets proxy_port and proxy_pid.
start_proxy() {
    local name=$1 workers=$2 dir="$tmp/$1-$2"
    mkdir -p "$dir"
    proxy_port=$(free_port)
    case $name in
        kaguard)
            start "$dir/run.log" "$tmp/kaguard" run --listen "127.0.0.1:$proxy_port" \
                --upstream "127.0.0.1:$up_port" --access-log off --workers "$workers"
            ;;
        nginx)
            nginx_proxy_conf "$workers" "$proxy_port" "$dir" >"$dir/nginx.conf"
            start "$dir/run.log" "$nginx_bin" -p "$dir/" -c "$dir/nginx.conf" -g 'daemon off;'
            ;;
        haproxy)
            haproxy_conf "$workers" "$proxy_port" >"$dir/haproxy.cfg"
            start "$dir/run.log" "$haproxy_bin" -f "$dir/haproxy.cfg" -db
            ;;
    esac
    proxy_pid=$last_pid
    wait_for_port "$proxy_port" "$proxy_pid" "$dir/run.log"
}

# cpu_ticks PID: user+system clock ticks of PID and all its children threads and processes.
cpu_ticks() {
    local total=0 p stat
    for p in $1 $(pgrep -P "$1" || true); do
        stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        # fields after the comm: state is 1st, utime 12th, stime 13th
        read -r -a f <<<"$stat"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

results="$tmp/results.tsv"
: >"$results"
# measure NAME WORKERS CONNS SIZE ROUND PORT PID
measure() {
    local name=$1 workers=$2 conns=$3 size=$4 round=$5 port=$6 pid=$7 out before after
    out="$tmp/wrk-$name-$workers-$conns-$size-$round.txt"
    before=$(cpu_ticks "$pid")
    wrk -t1 -c"$conns" -d"${DURATION}s" --latency "http://127.0.0.1:$port/$size" >"$out" 2>&1 || true
    after=$(cpu_ticks "$pid")
    python3 "$here/wrk-summary.py" row "$out" "$name" "$workers" "$conns" "$size" "$round" \
        "$((after - before))" "$(getconf CLK_TCK)" >>"$results"
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
