#!/usr/bin/env bash
# Builds kaguard with profile-guided optimization and prints the binary's path:
#   1. a build that counts how often each branch and function runs (`-Cprofile-generate`);
#   2. a training run of that build with kaguard's defaults (access log on), in front of
#      `kaguard upstream` with Tomcat's closes (100 requests per connection, announced) and a
#      200 ms idle timeout: keep-alive GETs with small bodies from wrk, a few with browser-sized
#      heads and 16 KiB bodies, and `kaguard race` with GET and POST through pauses that meet
#      the upstream's idle timeout, so the pool's closes, the learner and the retries run too;
#   3. the build that lays out and inlines the code by those counts (`-Cprofile-use`).
# Only the proxy's counts are used. The training shares no config with the benchmarks and
# runs in front of another upstream, but its first load, small keep-alive GETs, is the kind of
# request `bench/throughput.sh` measures most. Code it does not run (chunked bodies,
# trailers, health checks, DNS) is laid out as cold. Takes two release builds (about 6 minutes
# on 2 cores) and about 15 s of training.
#
#   bench/pgo.sh                 # prints target/pgo/<host>/release/kaguard
#
# Needs wrk (from Debian's packages, installed when missing, as root) and rustup's llvm-tools
# component for llvm-profdata (added when missing). RUSTFLAGS is set for both builds, so a
# `build.rustflags` of the user's own does not apply to them. Loopback only; every process it
# starts is stopped on exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"
# The toolchain is the one the project's directory selects, llvm-profdata included.
cd "$root"

install_missing wrk
need wrk
need rustup
tmp=$(mktemp -d /tmp/kaguard-pgo.XXXXXX)
trap cleanup EXIT

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [[ ! -x $profdata ]]; then
    say "adding rustup's llvm-tools component (for llvm-profdata)"
    rustup component add llvm-tools >&2
fi
[[ -x $profdata ]] || die "no llvm-profdata at $profdata"

# `--target` keeps the flags off build scripts and proc macros, which would write counts of
# their own while the build runs.
build() { # TARGET_DIR RUSTFLAGS
    RUSTFLAGS=$2 cargo build --release --quiet --target "$host" --target-dir "$1"
}

# A fixed directory, so that the counting build is rebuilt only when the code changes.
profiles="$root/target/pgo-profiles"
say "pgo: building the counting build"
build "$root/target/pgo-gen" "-Cprofile-generate=$profiles"
counting="$root/target/pgo-gen/$host/release/kaguard"
rm -rf "$profiles"

say "pgo: training"
# The helpers' counts go elsewhere: the upstream and the client share tokio, bytes and http
# with the proxy, and would weigh their own use of them in.
helpers="LLVM_PROFILE_FILE=$tmp/helpers/%p.profraw"
up_port=$(free_port)
start "$tmp/upstream.log" env "$helpers" "$counting" upstream --listen "127.0.0.1:$up_port" \
    --preset tomcat --idle-timeout 200ms
up_pid=$last_pid
wait_for_port "$up_port" "$up_pid" "$tmp/upstream.log"
port=$(free_port)
start "$tmp/kaguard.log" "$counting" run --listen "127.0.0.1:$port" \
    --upstream "127.0.0.1:$up_port" --access-log "$tmp/access.log"
kg_pid=$last_pid
wait_for_port "$port" "$kg_pid" "$tmp/kaguard.log"
url="http://127.0.0.1:$port"
# wrk exits 0 whatever the answers were: its errors are looked for in what it prints.
train() { # OUTPUT COMMAND...
    local out=$1
    shift
    "$@" >"$out" 2>&1 || die "training: $* failed: $(cat "$out")"
    ! grep -qE 'Non-2xx|Socket errors' "$out" || die "training: $*: $(cat "$out")"
}
train "$tmp/small.out" wrk -t1 -c64 -d5s "$url/"
train "$tmp/browser.out" wrk -t1 -c16 -d3s "$url/page?size=16384" \
    -H 'User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0' \
    -H 'Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8' \
    -H 'Accept-Language: en-US,en;q=0.5' -H 'Accept-Encoding: gzip, deflate, br' \
    -H 'Cookie: session=7f3a9c21e4b84d0f9a6e2c5b1d8f0a3c; theme=dark'
train "$tmp/race.out" env "$helpers" "$counting" race --target "$url/" --method mix \
    --timeout 200ms --connections 20 --requests 400 --duration 10s --quiet
alive "$kg_pid" || die "kaguard exited during the training: $(cat "$tmp/kaguard.log")"
# The proxy writes its counts when it exits, which SIGTERM's graceful shutdown lets it do.
stop "$kg_pid" TERM
stop "$up_pid" TERM
compgen -G "$profiles/*.profraw" >/dev/null || die "kaguard wrote no profile in $profiles"

say "pgo: building with the profile"
"$profdata" merge -o "$tmp/kaguard.profdata" "$profiles"
# A new path each time: cargo rebuilds when the flags change, not when the file does.
build "$root/target/pgo" "-Cprofile-use=$tmp/kaguard.profdata"
echo "$root/target/pgo/$host/release/kaguard"
