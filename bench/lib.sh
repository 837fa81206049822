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
wait_for_line() {
    local i
    for ((i = 0; i < 50; i++)); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        alive "$3" || die "process $3 exited: $(cat "$1")"
        sleep 0.1
    done
    die "no '$2' in $1 after 5 s: $(cat "$1")"
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

