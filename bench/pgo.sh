#!/usr/bin/env bash
# Builds kaguard with profile-guided optimization and prints the binary's path:
#   1. a build that counts how often each branch and function runs (`-Cprofile-generate`);
#   2. a training run of that build with kaguard's defaults, in front of `kaguard upstream`
#      (Tomcat's closes: 100 requests per connection, some idle closes): keep-alive GETs with
#      wrk, a few with browser-sized heads and 16 KiB bodies, and `kaguard race` with GET and
#      POST through pauses that meet the upstream's idle timeout, so the pool's closes, the
#      learner and the retries run too;
#   3. the build that lays out and inlines the code by those counts (`-Cprofile-use`).
# The training does not use the benchmarks' upstream, configs or request: it is the proxy's
# ordinary work. Takes two release builds (about 6 minutes on 2 cores) and 15 s of training.
#
#   bench/pgo.sh                 # prints target/pgo/<host>/release/kaguard
#
# Needs wrk (from Debian's packages, installed when missing, as root) and rustup's llvm-tools
# component for llvm-profdata (added when missing). Loopback only; every process it starts is
# stopped on exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

install_missing wrk
need wrk
tmp=$(mktemp -d /tmp/kaguard-pgo.XXXXXX)
trap cleanup EXIT

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [[ ! -x $profdata ]]; then
    say "adding rustup's llvm-tools component (for llvm-profdata)"
    rustup component add llvm-tools >&2
fi
[[ -x $profdata ]] || die "no llvm-profdata at $profdata"

# `--target` keeps the flags off build scripts and proc macros, which would write profiles
# of their own while the build runs.
build() { # TARGET_DIR RUSTFLAGS
    (cd "$root" && RUSTFLAGS=$2 cargo build --release --quiet --target "$host" --target-dir "$1")
}

say "pgo: building the counting build"
build "$root/target/pgo-gen" "-Cprofile-generate=$tmp/profiles"
counting="$root/target/pgo-gen/$host/release/kaguard"

say "pgo: training"
up_port=$(free_port)
start "$tmp/upstream.log" "$counting" upstream --listen "127.0.0.1:$up_port" --preset tomcat \
    --idle-timeout 200ms
up_pid=$last_pid
wait_for_port "$up_port" "$up_pid" "$tmp/upstream.log"
port=$(free_port)
start "$tmp/kaguard.log" "$counting" run --listen "127.0.0.1:$port" \
    --upstream "127.0.0.1:$up_port" --access-log "$tmp/access.log"
kg_pid=$last_pid
wait_for_port "$port" "$kg_pid" "$tmp/kaguard.log"
url="http://127.0.0.1:$port"
{
    wrk -t1 -c64 -d5s "$url/"
    wrk -t1 -c16 -d3s "$url/page?size=16384" \
        -H 'User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0' \
        -H 'Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8' \
        -H 'Accept-Language: en-US,en;q=0.5' -H 'Accept-Encoding: gzip, deflate, br' \
        -H 'Cookie: session=7f3a9c21e4b84d0f9a6e2c5b1d8f0a3c; theme=dark'
    "$counting" race --target "$url/" --method mix --timeout 200ms --connections 20 \
        --requests 400 --duration 10s --quiet
} >"$tmp/training.log" 2>&1 || die "training failed: $(cat "$tmp/training.log")"
# The profiles are written as each process exits.
stop "$kg_pid" TERM
stop "$up_pid" TERM

say "pgo: building with the profile"
"$profdata" merge -o "$tmp/kaguard.profdata" "$tmp/profiles"
build "$root/target/pgo" "-Cprofile-use=$tmp/kaguard.profdata"
echo "$root/target/pgo/$host/release/kaguard"
