#!/usr/bin/env bash
# The suite on a busy machine (issue 16's proof): a fresh clone of this checkout's HEAD, with
# ../shared beside it when there is one, runs scripts/test.sh RUNS times in a row (default 3)
# while one busy loop per core keeps every core busy. Each run's log and a summary go to
# OUT (default /tmp/gpujobs-under-load); exits non-zero when any run failed.
#   scripts/test-under-load.sh [RUNS] [-- pytest args]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
runs="${1:-3}"
shift $(( $# > 0 ? 1 : 0 ))
[ "${1:-}" = "--" ] && shift
out="${OUT:-/tmp/gpujobs-under-load}"
rm -rf "$out" && mkdir -p "$out"
git clone -q "$root" "$out/main"
if [ -d "$root/../shared" ]; then cp -r "$root/../shared" "$out/shared"; fi
summary="$out/summary.txt"
echo "commit $(git -C "$out/main" rev-parse --short HEAD), $runs runs, $(nproc) busy loops" > "$summary"
loops=()
for _ in $(seq "$(nproc)"); do
    python3 -c "while True: pass" &
    loops+=("$!")
done
trap 'kill "${loops[@]}" 2>/dev/null || true' EXIT
failed=0
for i in $(seq "$runs"); do
    started=$(date +%s)
    load=$(cut -d' ' -f1 /proc/loadavg)
    rc=0
    (cd "$out/main" && bash scripts/test.sh -p no:cacheprovider "$@") > "$out/run$i.log" 2>&1 || rc=$?
    [ "$rc" -eq 0 ] || failed=1
    echo "run $i: rc $rc, $(( $(date +%s) - started )) s, load average $load at the start:" \
        "$(tail -n 1 "$out/run$i.log")" >> "$summary"
done
cat "$summary"
exit "$failed"
