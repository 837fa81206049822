#!/usr/bin/env bash
# The keep-alive race, kaguard and nginx side by side: same upstreams, same client, one run.
#
#   bench/race.sh            full: about 8 minutes of runs, after the build (2-3 minutes from
#                            scratch on 2 cores, fat LTO)
#   QUICK=1 bench/race.sh    about 2 minutes of runs
#
# For each upstream (a, b, c below) and each method (GET, POST), one run through kaguard and one
# through nginx, alternating. Every run gets a fresh upstream and a fresh proxy on free loopback
# ports, so the upstream's final "connections=N requests=M" line belongs to that run alone.
# Prints one JSON record per run, then a table, then the same table as Markdown. docs/race.md
# explains what each upstream provokes and how to read the table.
#
# Environment:
#   QUICK=1             fewer requests (see the sizes below)
#   A_REQUESTS, B_ROUNDS, C_REQUESTS   override the sizes
#   KAGUARD_SRC=DIR     build kaguard from another checkout (default: this repository)
#   KEEP=1              keep the temporary directory with every process's log
#
# Needs: bash, cargo, python3, timeout; nginx (installed with apt-get when missing and root).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=${KAGUARD_SRC:-$(cd "$here/.." && pwd)}
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

# Every client run uses 20 keep-alive connections, as in docs/race.md and the peer measurements.
connections=20
if [[ ${QUICK:-0} == 1 ]]; then
    a_requests=${A_REQUESTS:-300}
    b_rounds=${B_ROUNDS:-4}
    c_requests=${C_REQUESTS:-12000}
else
    # 2520 requests at 20 per ~0.48 s round: the 60 s of the peer measurements.
    a_requests=${A_REQUESTS:-2520}
    # 7 rounds of 5 s: the first opens connections, the next six reuse them after pauses of
    # 5001 ms down to 4996 ms, the idle ages where a 5 s upstream closes.
    b_rounds=${B_ROUNDS:-7}
    c_requests=${C_REQUESTS:-60000}
fi

# --- set-up -------------------------------------------------------------------------------

need python3
need timeout
need cargo
if ! nginx_bin=$(find_nginx); then
    [[ $(id -u) == 0 ]] || die "nginx is not installed; as root this script would apt-get it"
    say "installing nginx (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
    nginx_bin=$(find_nginx) || die "nginx still not found after apt-get install"
fi
nginx_has_e=0
if "$nginx_bin" -h 2>&1 | grep -q -- '-e filename'; then
    # nginx >= 1.19.5: the startup error log goes to the run's file, not /var/log/nginx.
    nginx_has_e=1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/kaguard-race.XXXXXX")
# nginx workers run as nobody when started by root; let them reach their run directory.
chmod 755 "$tmp"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

started=$SECONDS
say "building kaguard in $src (cargo build --release)"
(cd "$src" && cargo build --release)
target_dir=$(cd "$src" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
# A private copy: others may rebuild target/release/kaguard while the bench runs.
kaguard="$tmp/kaguard"
cp "$target_dir/release/kaguard" "$kaguard"
built=$SECONDS

{
    echo "# kaguard race bench, $(date -u '+%Y-%m-%d %H:%M UTC')${QUICK:+ (QUICK=$QUICK)}"
    echo "machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), kernel $(uname -r)"
    echo "nginx:   $("$nginx_bin" -v 2>&1)"
    echo "kaguard: $(source_version "$src")"
    echo "sizes:   a=$a_requests requests, b=$b_rounds rounds x $connections, c=$c_requests requests; $connections client connections"
}

# --- one run ----------------------------------------------------------------------------------

# upstream_args WHICH: sets `up_args`, the flags of `kaguard upstream` for upstream WHICH (a, b or c).
upstream_args() {
    case $1 in
    a) up_args=(--idle-timeout 500ms) ;;
    b) up_args=(--preset node) ;;
    c) up_args=(--max-requests 100 --silent --idle-timeout none) ;;
    esac
}

# race_args WHICH: sets `race_args_out` (flags of `kaguard race`) and `bound` (seconds).
race_args() {
    case $1 in
    a)
        # The default sweep, as the peers were measured: pauses 501 ms down to 450 ms.
        race_args_out=(--timeout 500ms --requests "$a_requests" --duration 120s)
        bound=150
        ;;
    b)
        # Pauses 5001 ms down to 4996 ms (--below 5ms), one round per 5 s.
        local seconds=$((b_rounds * 5 + 10))
        race_args_out=(--timeout 5s --below 5ms --requests $((b_rounds * connections))
            --duration "${seconds}s")
        bound=$((seconds + 30))
        ;;
    c)
        # Steady load: each connection paces itself (--no-sync), pauses 11 ms down to 0 ms.
        race_args_out=(--timeout 10ms --below 10ms --no-sync --requests "$c_requests" --duration 90s)
        bound=120
        ;;
    esac
}

# run_one WHICH METHOD PROXY: one race run behind a fresh upstream and a fresh proxy; appends a
# JSON record to $tmp/runs.jsonl and prints it.
run_one() {
    local which=$1 method=$2 proxy=$3
    local dir="$tmp/$which-$method-$proxy"
    mkdir -p "$dir"
    local up_port proxy_port up_pid proxy_pid
    up_port=$(free_port)
    proxy_port=$(free_port)
    upstream_args "$which"
    race_args "$which"

    start "$dir/upstream.log" "$kaguard" upstream --listen "127.0.0.1:$up_port" "${up_args[@]}"
    up_pid=$last_pid
    # Waits for the upstream's own line: a probe connection would be counted as a connection.
    wait_for_line "$dir/upstream.log" 'listening on' "$up_pid"

    case $proxy in
    kaguard)
        start "$dir/proxy.log" "$kaguard" run --listen "127.0.0.1:$proxy_port" \
            --upstream "127.0.0.1:$up_port" --access-log off --workers 1
        ;;
    nginx)
        nginx_conf "$dir" "$up_port" "$proxy_port"
        local elog=()
        [[ $nginx_has_e == 1 ]] && elog=(-e "$dir/error.log")
        start "$dir/proxy.log" "$nginx_bin" -p "$dir/" "${elog[@]}" -c "$dir/nginx.conf" \
            -g 'daemon off;'
        ;;
    esac
    proxy_pid=$last_pid
    wait_for_port "$proxy_port" "$proxy_pid" "$dir/proxy.log"

    say "($which) $method through $proxy: kaguard race ${race_args_out[*]}"
    # In the background and waited for, so that a signal to this script ends the run at once
    # (bash defers traps until a foreground command returns).
    local rc=0 race_pid
    timeout --signal=INT "$bound" "$kaguard" race --target "http://127.0.0.1:$proxy_port/" \
        --connections "$connections" --method "$method" "${race_args_out[@]}" --json --quiet \
        >"$dir/race.json" 2>"$dir/race.err" &
    race_pid=$!
    pids+=("$race_pid")
    wait "$race_pid" || rc=$?
    forget "$race_pid"
    stop "$proxy_pid" TERM
    stop "$up_pid" INT
    [[ $rc == 0 && $(head -c1 "$dir/race.json") == '{' ]] ||
        die "kaguard race failed (exit $rc) in $dir: $(cat "$dir/race.err")"

    local counts conns=null reqs=null log="$dir/proxy.log"
    [[ $proxy == nginx ]] && log="$dir/error.log"
    counts=$(grep -o 'connections=[0-9]* requests=[0-9]*' "$dir/upstream.log" | tail -1 || true)
    if [[ $counts =~ connections=([0-9]+)\ requests=([0-9]+) ]]; then
        conns=${BASH_REMATCH[1]}
        reqs=${BASH_REMATCH[2]}
    fi
    local record
    record=$(printf '{"case":"%s","method":"%s","proxy":"%s","upstream_connections":%s,"upstream_requests":%s,"log":%s,"race":%s}' \
        "$which" "$method" "$proxy" "$conns" "$reqs" "$(race_log_counts "$log")" "$(cat "$dir/race.json")")
    echo "$record" >>"$tmp/runs.jsonl"
    echo "$record"
}

# --- the runs -------------------------------------------------------------------------------

for which in a b c; do
    # Alternating, and alternating who goes first, so that neither proxy always runs on a machine
    # that has just warmed up (or heated up).
    run_one "$which" get kaguard
    run_one "$which" get nginx
    run_one "$which" post nginx
    run_one "$which" post kaguard
done

echo
python3 "$here/race-table.py" "$tmp/runs.jsonl"
echo
echo "build $((built - started)) s, runs $((SECONDS - built)) s"
