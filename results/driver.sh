# The part of results/*/run.sh that every long experiment shares, sourced by them: which runs are still pending
# (a run is done once its committed summary in $RESULTS records KIMG kimg), the commit of each finished run's
# summary, and running the pending runs JOBS at a time. The sourcing script sets RESULTS, KIMG, COMMIT and JOBS
# and defines one NAME, which trains run NAME to KIMG and writes and commits its summary.

done_kimg() {  # kimg recorded in the run's committed summary, 0 if none
  python -c "import json,sys; print(json.load(open(sys.argv[1]))['kimg'])" "$RESULTS/$1.json" 2>/dev/null || echo 0
}

commit() {  # commit only this file; retried while another git operation (a merge) holds the index
  [ "$COMMIT" = 1 ] || return 0
  for i in $(seq 30); do
    git add "$1" 2>/dev/null && git commit -q -m "$2" -- "$1" && return 0
    sleep 60
  done
  echo "could not commit $1: commit it by hand" >&2
}

run_pending() {  # one for every run of $@ whose summary holds fewer than KIMG kimg, JOBS at a time
  local pending=() r running=0
  for r in "$@"; do
    awk -v a="$(done_kimg $r)" -v b="$KIMG" 'BEGIN{exit !(a < b)}' && pending+=("$r")
  done
  echo "pending at $KIMG kimg: ${pending[*]:-none}" >&2
  for r in "${pending[@]}"; do
    one "$r" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
  done
  wait
}
