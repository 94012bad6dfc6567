#!/bin/bash
# A/B of whole merges: code trees (or `cp`) alternate on the 1.1B shape that benchmarks/merge.py
# leaves in its work folder; each run after removing the last output, `sync` and a 1 s pause.
#
#   benchmarks/merge_ab.sh [--fresh-hash] [--cold] ROUNDS VARIANT...
#   VARIANT: cp | DIR[:ENV=VALUE,...]  (DIR: a source tree, e.g. `git archive HEAD~1 | tar -x -C /tmp/old`)
#   e.g. benchmarks/merge_ab.sh 3 /tmp/old . ./:OMP_NUM_THREADS=1
#
# --fresh-hash: an empty hash cache before every run, so each merge also hashes the base.
# --cold: the base and adapter dropped from the page cache before every run (read from disk).
# Prints one line per run: wall seconds, user+system CPU seconds, peak RSS (KiB), from /usr/bin/time.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B=${MERGE_BENCH_DIR:-/tmp/switchyard-merge-bench/tinyllama}
FRESH=0 COLD=0
while [ "${1:-}" = --fresh-hash ] || [ "${1:-}" = --cold ]; do
  [ "$1" = --fresh-hash ] && FRESH=1
  [ "$1" = --cold ] && COLD=1
  shift
done
ROUNDS=$1; shift
[ -d "$B/base" ] || { echo "no $B/base: run benchmarks/merge.py once first" >&2; exit 2; }
export HF_HUB_OFFLINE=1
for _ in $(seq "$ROUNDS"); do
  for v in "$@"; do
    cache=$B/cache
    # only the hash cache: the native kernel's build (merger/native) stays, as on any machine after its first merge
    if [ "$FRESH" = 1 ]; then cache=$B/cache-fresh; rm -f "$cache/switchyard/sha256.json"; fi
    rm -rf "$B/ab-out"; sync
    if [ "$COLD" = 1 ]; then
      "$ROOT/.venv/bin/python" -c "import sys; sys.path.insert(0, '$ROOT/benchmarks'); from pathlib import Path; \
from merge import evict; evict(Path('$B/base'), Path('$B/adapter'))"
    fi
    sleep 1
    if [ "$v" = cp ]; then
      /usr/bin/time -f "[cp] %e s wall %U+%S cpu" bash -c "cp -r $B/base $B/ab-out && sync"
    else
      dir=${v%%:*}; envs=()
      [ "$v" != "$dir" ] && IFS=, read -ra envs <<< "${v#*:}"
      # the tree's own code, on this checkout's environment
      (cd "$dir" && env "${envs[@]}" XDG_CACHE_HOME="$cache" /usr/bin/time -f "[$v] %e s wall %U+%S cpu %M KB" \
        "$ROOT/.venv/bin/python" -c "from switchyard.cli import main; main()" \
        merge "$B/base" "$B/adapter" --quiet --force --out "$B/ab-out" > /dev/null)
    fi
  done
done
rm -rf "$B/ab-out"; rm -f "$B/cache-fresh/switchyard/sha256.json"
