# Helpers for the bench scripts: processes that are always stopped, free ports, readiness.
# Sourced, not run. Callers set `tmp` (a directory removed on exit unless KEEP=1) and install
# `cleanup` as the EXIT trap.
# shellcheck shell=bash

# Pids of every background process started with `start`, until `stop` reaps it.
pids=()

say() { printf '%s\n' "$*" >&2; }

die() {
    say "$(basename "$0"): $*"
    exit 1
}

need() { command -v "$1" >/dev/null || die "$1 is needed and not installed"; }

# find_nginx: prints the nginx binary; /usr/sbin is often not on a non-root PATH.
find_nginx() {
    if command -v nginx 2>/dev/null; then
        return 0
    fi
    [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx
}

# free_port: a loopback port the kernel has just handed out, so nothing else is listening on it.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start LOG CMD...: runs CMD in the background with its output in LOG; its pid in `last_pid`.
start() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    # shellcheck disable=SC2034 # read by the caller
    last_pid=$!
    pids+=("$last_pid")
}

# alive PID: the process exists and is not a zombie waiting to be reaped.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# stop PID SIGNAL: sends SIGNAL, waits up to 10 s, then SIGKILL; reaps the process.
stop() {
    local pid=$1 sig=$2 i
    kill -s "$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "pid $pid did not stop on SIG$sig within 10 s; killing it"
        kill -s KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    forget "$pid"
}

# forget PID: drops a reaped process from `pids`.
forget() {
    local pid kept=()
    for pid in "${pids[@]}"; do
        [[ $pid == "$1" ]] || kept+=("$pid")
    done
    pids=("${kept[@]}")
}

cleanup() {
    local status=$? pid
    for pid in "${pids[@]}"; do
        stop "$pid" TERM
    done
    if [[ -n ${tmp:-} && -d $tmp ]]; then
        # Kept when asked, or after a failure (not after Ctrl-C or SIGTERM).
        if [[ ${KEEP:-0} == 1 || ! $status =~ ^(0|130|143)$ ]]; then
            say "logs kept in $tmp"
        else
            rm -rf "$tmp"
        fi
    fi
}

# wait_for_line FILE PATTERN PID: until FILE has a line matching PATTERN (5 s at most).
wait_for_line() { wait_for_line_within "$1" "$2" "$3" 5; }

# wait_for_line_within FILE PATTERN PID SECONDS: until FILE has a line matching PATTERN, for
# SECONDS (an integer) at most; dies when PID exits first.
wait_for_line_within() {
    local i
    for ((i = 0; i < $4 * 10; i++)); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        alive "$3" || die "process $3 exited: $(cat "$1")"
        sleep 0.1
    done
    die "no '$2' in $1 after $4 s: $(cat "$1")"
}

# wait_for_port PORT PID LOG: until 127.0.0.1:PORT accepts a TCP connection (5 s at most).
wait_for_port() {
    local i
    for ((i = 0; i < 50; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        alive "$2" || die "process $2 exited: $(cat "$3")"
        sleep 0.1
    done
    die "nothing accepts on port $1 after 5 s: $(cat "$3")"
}

# nginx_conf DIR UPSTREAM_PORT LISTEN_PORT: writes DIR/nginx.conf.
nginx_conf() {
    cat >"$1/nginx.conf" <<EOF
# nginx as people copy it: one worker, "keepalive 16", HTTP/1.1 with the Connection header
# cleared, nginx's defaults otherwise (proxy_next_upstream error timeout, keepalive_timeout 60s,
# keepalive_requests 1000). Paths point into this run's directory. No access log: kaguard runs
# with --access-log off.
worker_processes 1;
error_log $1/error.log;
pid $1/nginx.pid;
events {}
http {
    access_log off;
    client_body_temp_path $1/client_body_temp;
    proxy_temp_path $1/proxy_temp;
    fastcgi_temp_path $1/fastcgi_temp;
    uwsgi_temp_path $1/uwsgi_temp;
    scgi_temp_path $1/scgi_temp;
    upstream u {
        server 127.0.0.1:$2;
        keepalive 16;
    }
    server {
        listen 127.0.0.1:$3;
        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

# The log lines of a lost race, in nginx's words (kaguard logs its failures and its re-sends
# with the same words): EOF or reset on a reused connection, or a write into a closed one.
race_pattern='upstream prematurely closed connection|\(104: Connection reset by peer\)|\(32: Broken pipe\)'

# count_lines PATTERN FILE: lines of FILE matching the extended regex PATTERN; 0 without FILE.
count_lines() {
    local n
    n=$(grep -cE "$1" "$2" 2>/dev/null) || true
    echo "${n:-0}"
}

# race_log_counts LOG: a JSON object counting LOG's race lines by kind, and kaguard's re-sends.
race_log_counts() {
    printf '{"race_lines":%s,"prematurely_closed":%s,"reset":%s,"broken_pipe":%s,"resent":%s}' \
        "$(count_lines "$race_pattern" "$1")" \
        "$(count_lines 'upstream prematurely closed connection' "$1")" \
        "$(count_lines '\(104: Connection reset by peer\)' "$1")" \
        "$(count_lines '\(32: Broken pipe\)' "$1")" \
        "$(count_lines 'sending the request again' "$1")"
}

# source_version DIR: the git commit of DIR and its uncommitted files, or just DIR.
source_version() {
    local rev dirty
    if rev=$(git -C "$1" rev-parse --short HEAD 2>/dev/null); then
        dirty=$(git -C "$1" status --porcelain -- src Cargo.toml Cargo.lock |
            awk '{print $2}' | tr '\n' ' ')
        echo "$1 at $rev${dirty:+ + uncommitted changes to: $dirty}"
    else
        echo "$1 (not a git checkout)"
    fi
}


# --- the proxy benches: throughput.sh, idle.sh, reuse.sh ----------------------------------
# kaguard, nginx and HAProxy as reverse proxies in front of one nginx upstream, each with the
# config below. A script sets `tmp`, calls `install_missing`, `find_binaries`, `build_kaguard`,
# `start_upstream`, then `start_proxy` for each proxy.

# Idle upstream connections nginx and kaguard keep (HAProxy keeps any number, its default):
# the same pool for all, and larger than any client connection count used, so no proxy closes
# and reopens upstream connections under load.
KEEPALIVE=${KEEPALIVE:-512}

# Client-side limits of the proxy configs; a script may change them before `start_proxy`.
# These are throughput.sh's: HAProxy's maxconn stays within an fd limit of 20000 (HAProxy
# wants about two fds per connection and refuses to start otherwise, see strict-limits).
nginx_worker_connections=8192
nginx_keepalive_timeout=75s # nginx's default
haproxy_maxconn=8000
haproxy_client_timeout=60s  # timeout client and timeout http-keep-alive
haproxy_strict_limits=1     # 0: `no strict-limits`, HAProxy starts with fewer fds than maxconn asks

# find_haproxy: prints the haproxy binary; /usr/sbin is often not on a non-root PATH.
find_haproxy() {
    if command -v haproxy 2>/dev/null; then
        return 0
    fi
    [[ -x /usr/sbin/haproxy ]] && echo /usr/sbin/haproxy
}

# install_missing TOOL...: installs those of TOOL (nginx, haproxy, wrk, ...) that are missing,
# from Debian's packages of the same name.
install_missing() {
    local tool missing=()
    for tool in "$@"; do
        case $tool in
            nginx) [[ -n $(find_nginx) ]] ;;
            haproxy) [[ -n $(find_haproxy) ]] ;;
            *) command -v "$tool" >/dev/null ;;
        esac || missing+=("$tool")
    done
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "${missing[*]} not installed; as root this script would apt-get them"
    say "installing ${missing[*]} from Debian's packages"
    # Nothing on standard output, which bench/pgo.sh keeps for the path it prints.
    apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# find_binaries: sets nginx_bin, and haproxy_bin when HAProxy is installed.
find_binaries() {
    nginx_bin=$(find_nginx) || die "nginx is not installed"
    haproxy_bin=$(find_haproxy) || haproxy_bin=
}

# build_kaguard ROOT: `cargo build --release` in ROOT, or with PGO=1 the profile-guided build of
# bench/pgo.sh, and a private copy in $tmp/kaguard (others may rebuild the target directory
# while a bench runs).
build_kaguard() {
    local target bin
    if [[ ${PGO:-0} == 1 ]]; then
        say "building kaguard (release, profile-guided: bench/pgo.sh)"
        bin=$("$1/bench/pgo.sh") || die "bench/pgo.sh failed"
        [[ -x $bin ]] || die "bench/pgo.sh printed no binary: $bin"
        cp "$bin" "$tmp/kaguard"
        return
    fi
    say "building kaguard (release)"
    (cd "$1" && cargo build --release --quiet)
    target=$(cd "$1" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    cp "$target/release/kaguard" "$tmp/kaguard"
}

# start_upstream DIR [log]: the upstream, one nginx worker serving /small (2 bytes), /16k and /1m
# from files. With "log", DIR/access.log gets "$connection $connection_requests" for each request
# (buffered: complete once the upstream is stopped). Sets up_port and up_pid.
start_upstream() {
    local dir=$1 access_log="access_log off;"
    if [[ ${2:-} == log ]]; then
        access_log="log_format reuse '\$connection \$connection_requests';
    access_log $dir/access.log reuse buffer=64k;"
    fi
    up_port=$(free_port)
    mkdir -p "$dir/www" "$dir/logs"
    printf 'OK' >"$dir/www/small"
    head -c 16384 /dev/zero | tr '\0' 'x' >"$dir/www/16k"
    head -c 1048576 /dev/zero | tr '\0' 'x' >"$dir/www/1m"
    # mktemp makes $tmp private; nginx's workers run as another user and must read the files.
    chmod a+rX "$tmp"
    chmod -R a+rX "$dir"
    cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/logs/error.log;
events { worker_connections 4096; }
http {
    $access_log
    keepalive_requests 100000;
    server {
        listen 127.0.0.1:$up_port;
        root $dir/www;
        location = /small { default_type text/plain; }
        location = /16k { default_type text/plain; }
        location = /1m { default_type text/plain; }
    }
}
CONF
    start "$dir/run.log" "$nginx_bin" -p "$dir/" -c "$dir/nginx.conf" -g 'daemon off;'
    up_pid=$last_pid
    wait_for_port "$up_port" "$up_pid" "$dir/run.log"
}

# The three proxy configs: the upstream at $up_port, HTTP/1.1 keep-alive on both sides, no
# access log, keepalive_requests 100000 on both sides (HAProxy has no such cap).
nginx_proxy_conf() { # workers port dir
    cat <<CONF
worker_processes $1;
pid $3/nginx.pid;
error_log $3/error.log;
events { worker_connections $nginx_worker_connections; }
http {
    access_log off;
    keepalive_timeout $nginx_keepalive_timeout;
    keepalive_requests 100000;
    upstream u { server 127.0.0.1:$up_port; keepalive $KEEPALIVE; keepalive_requests 100000; }
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
    maxconn $haproxy_maxconn
CONF
    [[ $haproxy_strict_limits == 1 ]] || echo "    no strict-limits"
    cat <<CONF
defaults
    mode http
    timeout connect 5s
    timeout client $haproxy_client_timeout
    timeout server 60s
    timeout http-keep-alive $haproxy_client_timeout
frontend f
    bind 127.0.0.1:$2
    default_backend b
backend b
    http-reuse safe
    server s1 127.0.0.1:$up_port maxconn 10000
CONF
}

# kaguard: its defaults (client keepalive_timeout 620 s, upstream keepalive_timeout 1 s) but the
# pool size and the two request caps, set as nginx's are above: with kaguard's default client
# cap of 1000, wrk reconnected every 1000 requests through kaguard and never through nginx.
kaguard_conf() { # workers port
    cat <<CONF
listen = "127.0.0.1:$2"
workers = $1
access_log = "off"

[downstream]
keepalive_requests = 100000

[[upstream]]
name = "u"
servers = ["127.0.0.1:$up_port"]
keepalive = $KEEPALIVE
keepalive_requests = 100000
CONF
}

# start_proxy NAME WORKERS: starts kaguard, nginx or haproxy with WORKERS workers (threads for
# kaguard and HAProxy, processes for nginx) in $tmp/NAME-WORKERS; sets proxy_port and proxy_pid.
start_proxy() {
    local name=$1 workers=$2 dir="$tmp/$1-$2"
    mkdir -p "$dir"
    proxy_port=$(free_port)
    case $name in
        kaguard)
            kaguard_conf "$workers" "$proxy_port" >"$dir/kaguard.toml"
            start "$dir/run.log" "$tmp/kaguard" run --config "$dir/kaguard.toml"
            ;;
        nginx)
            nginx_proxy_conf "$workers" "$proxy_port" "$dir" >"$dir/nginx.conf"
            start "$dir/run.log" "$nginx_bin" -p "$dir/" -c "$dir/nginx.conf" -g 'daemon off;'
            ;;
        haproxy)
            [[ -n $haproxy_bin ]] || die "haproxy is not installed"
            haproxy_conf "$workers" "$proxy_port" >"$dir/haproxy.cfg"
            start "$dir/run.log" "$haproxy_bin" -f "$dir/haproxy.cfg" -db
            ;;
        *) die "unknown proxy $name (expected kaguard, nginx or haproxy)" ;;
    esac
    proxy_pid=$last_pid
    wait_for_port "$proxy_port" "$proxy_pid" "$dir/run.log"
}

# tree_pids PID: PID and all its descendant processes (nginx's master and workers).
tree_pids() {
    local child
    echo "$1"
    for child in $(pgrep -P "$1" || true); do
        tree_pids "$child"
    done
}

# rss_kib PID: resident memory (VmRSS) of PID and its descendants, summed, in KiB.
rss_kib() {
    local total=0 p kib
    for p in $(tree_pids "$1"); do
        kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null) || continue
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

# established_to PORT: TCP connections in state ESTABLISHED whose remote end is port PORT
# (from the connecting side: a proxy's connections to the upstream at PORT).
established_to() {
    awk -v port="$(printf '%04X' "$1")" \
        'FNR > 1 && $4 == "01" && substr($3, index($3, ":") + 1) == port { n++ } END { print n + 0 }' \
        /proc/net/tcp /proc/net/tcp6
}
