#!/usr/bin/env bash
# Memory per idle client connection: kaguard, nginx and HAProxy, one worker each, in front of
# the nginx upstream of bench/throughput.sh, with the same configs (bench/lib.sh).
#
# For each proxy in turn, bench/idle-clients.py sends one warm-up request on a connection of its
# own; then the proxy's resident memory is read (VmRSS from /proc, summed over its processes:
# nginx's master and worker, HAProxy's and kaguard's one process). Then the client opens N
# keep-alive connections, BATCH at a time, each sending one GET /small and reading the whole
# response, and holds them all idle; the memory is read again. The table shows both readings,
# the growth per idle connection, and kaguard's growth per connection over nginx's.
#
#   bench/idle.sh                            # 10000 connections per proxy
#   N=2000 bench/idle.sh                     # quicker
#   N=20000 PROXIES="kaguard nginx" bench/idle.sh
#
# Environment:
#   N=10000            idle client connections per proxy
#   BATCH=50           connections opened at a time, so at most BATCH requests in flight and
#                      about as many upstream connections (counted in the table)
#   PROXIES="kaguard nginx haproxy"
#   KEEPALIVE=512      idle upstream connections nginx and kaguard keep (as in throughput.sh)
#   NOFILE=65536       open-file limit asked for with `ulimit -n`; when the hard limit is lower,
#                      the hard limit, and the script fails if that is below N + KEEPALIVE + 1024
#   SETTLE=1           seconds to wait before each memory reading
#   MAX_WAIT=300       seconds the client may take to open all N connections
#   KEEP=1             keep the temporary directory with every log
#
# Client-side limits and timeouts: nginx worker_connections and HAProxy maxconn are N plus room;
# kaguard has no connection cap. The client-side idle timeout is 620 s in all three (kaguard's
# default keepalive_timeout; nginx keepalive_timeout and HAProxy timeout client and http-keep-alive
# set to it), far beyond a run. Loopback only; every process it starts is stopped on exit. Needs
# root for apt-get when nginx or haproxy are missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

N=${N:-10000}
BATCH=${BATCH:-50}
PROXIES=${PROXIES:-"kaguard nginx haproxy"}
NOFILE=${NOFILE:-65536}
SETTLE=${SETTLE:-1}
MAX_WAIT=${MAX_WAIT:-300}
[[ $N =~ ^[1-9][0-9]*$ && $BATCH =~ ^[1-9][0-9]*$ && $MAX_WAIT =~ ^[1-9][0-9]*$ ]] ||
    die "N, BATCH and MAX_WAIT must be positive integers"

# Every process started from here inherits the limit: the client holds N sockets, a proxy N
# plus its upstream connections.
fds_needed=$((N + KEEPALIVE + 1024))
if ! ulimit -n "$NOFILE" 2>/dev/null; then
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && ((hard < NOFILE)); then
        ulimit -n "$hard" || die "cannot set the open-file limit to the hard limit $hard"
        say "open-file limit: cannot raise it to $NOFILE (hard limit $hard); using $hard"
    else
        die "ulimit -n $NOFILE failed (hard limit $hard)"
    fi
fi
nofile=$(ulimit -n)
[[ $nofile == unlimited ]] || ((nofile >= fds_needed)) ||
    die "N=$N needs an open-file limit of $fds_needed, and it is $nofile (hard $(ulimit -Hn));" \
        "raise the hard limit (limits.conf, prlimit, docker run --ulimit nofile=65536) or lower N"

# Room for N clients: nginx counts upstream connections in worker_connections too; HAProxy
# wants about two fds per maxconn and refuses to start without them unless told otherwise
# (idle connections take one fd each, so N of them fit).
nginx_worker_connections=$fds_needed
nginx_keepalive_timeout=620s
haproxy_maxconn=$((N + 1024))
haproxy_client_timeout=620s
if [[ $nofile != unlimited ]] && ((nofile < 2 * haproxy_maxconn + 100)); then
    haproxy_strict_limits=0
    [[ " $PROXIES " != *" haproxy "* ]] ||
        say "HAProxy: maxconn $haproxy_maxconn wants $((2 * haproxy_maxconn + 14)) fds and the limit is" \
            "$nofile: started with 'no strict-limits' (an idle client connection takes one fd)"
fi

need python3
install_missing nginx haproxy
find_binaries
tmp=$(mktemp -d /tmp/kaguard-idle.XXXXXX)
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
build_kaguard "$root"
start_upstream "$tmp/up"

results="$tmp/results.tsv"
: >"$results"
# measure NAME: one proxy, one worker; appends "name held failed before after upstream why".
measure() {
    local name=$1 log="$tmp/clients-$1.log" client_pid before after upstream line held failed why
    start_proxy "$name" 1
    start "$log" python3 "$here/idle-clients.py" 127.0.0.1 "$proxy_port" /small "$N" "$BATCH" "$MAX_WAIT"
    client_pid=$last_pid
    wait_for_line_within "$log" '^warm ' "$client_pid" 40
    grep -q '^warm 200$' "$log" || die "$name: the warm-up request did not get 200: $(cat "$log")"
    sleep "$SETTLE"
    before=$(rss_kib "$proxy_pid")
    say "$name: RSS $before KiB after one request; opening $N connections"
    kill -USR1 "$client_pid"
    wait_for_line_within "$log" '^open ' "$client_pid" $((MAX_WAIT + 40))
    sleep "$SETTLE"
    after=$(rss_kib "$proxy_pid")
    upstream=$(established_to "$up_port")
    kill -USR1 "$client_pid"
    wait_for_line_within "$log" '^still-open ' "$client_pid" 40
    read -r _ held _ failed why <<<"$(grep '^open ' "$log")"
    line=$(grep '^still-open ' "$log")
    if [[ ${line#still-open } != "$held" ]]; then
        why="${why:+$why,}closed-by-proxy=$((held - ${line#still-open }))"
    fi
    say "$name: RSS $after KiB with $held idle connections ($failed failed${why:+: $why})"
    # The client has closed its connections and exits; the proxy then has none left to drain.
    stop "$client_pid" TERM
    stop "$proxy_pid" TERM
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$held" "$failed" "$before" "$after" \
        "$upstream" "${why:--}" >>"$results"
}

say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for name in $PROXIES; do
    measure "$name"
done

echo
echo "Idle client connections: N=$N per proxy, 1 worker each, opened $BATCH at a time, each after one GET /small (2-byte body)"
echo
awk -F'\t' -v n="$N" '
    { name[NR] = $1; held[NR] = $2; failed[NR] = $3; before[NR] = $4; after[NR] = $5
      up[NR] = $6; why[NR] = $7
      per[NR] = $2 > 0 ? ($5 - $4) / $2 : 0
      if ($1 == "nginx") nginx = per[NR] }
    END {
        printf "| proxy | idle conns held | RSS before MiB | RSS with %d idle MiB | KiB per idle conn | per conn vs nginx | upstream conns at reading |\n", n
        print "|---|---|---|---|---|---|---|"
        for (i = 1; i <= NR; i++) {
            ratio = (name[i] == "kaguard" && nginx > 0) ? sprintf("%.2f", per[i] / nginx) : ""
            printf "| %s | %d | %.1f | %.1f | %.2f | %s | %d |\n", name[i], held[i],
                before[i] / 1024, after[i] / 1024, per[i], ratio, up[i]
        }
        for (i = 1; i <= NR; i++)
            if (failed[i] > 0 || why[i] != "-")
                printf "note %s: %d of %d connections failed to open; %s\n", name[i], failed[i], n,
                    why[i]
    }' "$results"
echo
echo "RSS: VmRSS summed over the proxy's processes (nginx: master + worker). Per connection: (with - before) / held."
echo "nginx allocates all its worker_connections slots ($nginx_worker_connections here) when it starts: they are in its RSS before, not in its growth."
