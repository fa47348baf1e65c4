#!/usr/bin/env bash
# The long reproductions (results/README.md, "At 500-1,000 kimg"): every run of every arm and seed,
# each resumed from its last checkpoint when this script is started again (train.py's resume is exact,
# so a run cut off and resumed equals the uninterrupted one), each finished run's summary committed to
# results/long/ at once. Checkpoints stay in runs/long/ (ignored by git).
#
#   bash results/long/run.sh                # every pending run, JOBS at a time (default 2), one thread each
#   bash results/long/run.sh quick-contrastive-s1   # one run
#   KIMG=1000 bash results/long/run.sh      # continue finished runs to 1,000 kimg (constant lr: the same run)
#   DRY=1 bash results/long/run.sh          # print the commands only
#   ALL=1 bash results/long/run.sh          # also (b)'s SEL-alone arm
#   PROFILE=gpu bash results/long/run.sh    # the same arms at the SN paper's full width on a CUDA GPU, bf16,
#                                           # one run at a time, summaries in results/long-gpu/
#
# A run is pending while its summary is missing or holds fewer than KIMG kimg. COMMIT=0: no commits;
# RUNS_DIR, RESULTS: other folders for the checkpoints and the summaries (e.g. to try the script on a tiny
# setting on a CPU: PROFILE=gpu DEVICE=cpu KIMG=0.1 FINAL=swd2k EXTRA='--amp none --metrics none' COMMIT=0
# RUNS_DIR=/tmp/r RESULTS=/tmp/s bash results/long/run.sh sndcgan-contrastive-s0).
set -uo pipefail
cd "$(dirname "$0")/../.."
KIMG=${KIMG:-500}
NICE=${NICE:-0}
COMMIT=${COMMIT:-1}
FINAL=${FINAL:-swd10k}   # the final score of each run
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# CPU: the quick preset's SN-DCGAN with its EMA generator at batch 32, the lr constant (so that a run
# continued from 500 to 1,000 kimg is the run that went to 1,000 at once), SWD / DI / FDDF on 2k images
# every 25 kimg. GPU: the same G and D at the SN paper's width (sndcgan: G 3.8M, D 2.9M parameters) and
# batch 64, with the same EMA. Contrastive warm-up: 50 kimg, 5% of 1,000 kimg (the thesis's "about 20
# epochs" is 5-6% of its 25M-image runs on 50-70k-image sets; 20 epochs of the built-in 50k set would be
# the whole run).
EVAL="--lr-decay-kimg 0 --metrics swd2k,di2k,fddf2k --metrics-kimg 25 --snap-kimg 25 --keep 1"
if [ "${PROFILE:-cpu}" = gpu ]; then
  BASE="--cfg sndcgan --ema-kimg 5 --ema-rampup 0.05 $EVAL --workers 4 --amp bf16 --log-sec 30 --device ${DEVICE:-cuda}"
  PREFIX=sndcgan RUNS_DIR=${RUNS_DIR:-runs/long-gpu} RESULTS=${RESULTS:-results/long-gpu} JOBS=${JOBS:-1}
else
  BASE="--cfg quick $EVAL --workers 1 --log-sec 60"
  PREFIX=quick RUNS_DIR=${RUNS_DIR:-runs/long} RESULTS=${RESULTS:-results/long} JOBS=${JOBS:-2}
fi
BASE="$BASE ${EXTRA:-}"   # EXTRA: flags for every run (the last one given wins), e.g. EXTRA="--amp none --metrics none"
declare -A ARM=(
  [$PREFIX-nonsat]=""                                            # (a) and (b): the baseline
  [$PREFIX-contrastive]="--loss contrastive --warmup-kimg 50"    # (a) supplement Table 1
  [$PREFIX-sel-align]="--sel norm --channels-last"               # (b) EqGAN-SA Table 2: SEL_norm + alignment (authors' code)
  [$PREFIX-sel]="--sel norm --no-align --channels-last"          # (b) SEL_norm alone
)
ORDER="$PREFIX-nonsat $PREFIX-contrastive $PREFIX-sel-align"   # seeds interleaved: s0 of every arm first
[ -n "${ALL:-}" ] && ORDER="$ORDER $PREFIX-sel"                # ALL=1: SEL alone too, if the budget allows
RUNS=""
for s in 0 1 2; do for a in $ORDER; do RUNS="$RUNS $a-s$s"; done; done
[ $# -gt 0 ] && RUNS="$*"

source results/driver.sh   # done_kimg, commit, run_pending

one() {  # one run to KIMG, then its summary
  local name=$1 arm=${1%-s*} seed=${1##*-s}
  [ -n "${ARM[$arm]+x}" ] || { echo "unknown run $name (arms: ${!ARM[*]})" >&2; return 1; }
  local cmd="python train.py $BASE ${ARM[$arm]} --seed $seed --kimg $KIMG --out $RUNS_DIR/$name"
  if [ -n "${DRY:-}" ]; then echo "$cmd"; return 0; fi
  mkdir -p $RUNS_DIR/$name
  echo "$(date '+%F %T') start $name: $cmd" >&2
  nice -n "$NICE" $cmd >> $RUNS_DIR/$name/stdout.txt 2>&1 || { echo "$(date '+%F %T') $name stopped (see $RUNS_DIR/$name/stdout.txt)" >&2; return 1; }
  mkdir -p $RESULTS
  # the final score: SWD on 10k generated vs 10k real images (a 2k SWD's own noise is measured in results/README.md)
  local ckpt=$(ls $RUNS_DIR/$name/ckpt-*.pt | tail -1)
  nice -n "$NICE" python metrics.py $ckpt --metrics $FINAL --seed 1 ${DEVICE:+--device $DEVICE} > $RUNS_DIR/$name/final.json || return 1
  python metrics.py --summary $RUNS_DIR/$name/log.jsonl | python -c "import json, sys
s = json.load(sys.stdin); f = json.load(open(sys.argv[1]))
s['final'].update({sys.argv[2] + '/' + k: v for k, v in f[sys.argv[2]].items()})
print(json.dumps(s))" $RUNS_DIR/$name/final.json $FINAL > $RESULTS/$name.json.tmp && mv $RESULTS/$name.json.tmp $RESULTS/$name.json
  commit $RESULTS/$name.json "Long reproduction run $name reached $KIMG kimg: its summary"
  echo "$(date '+%F %T') done $name" >&2
}

run_pending $RUNS
