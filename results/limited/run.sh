#!/usr/bin/env bash
# Limited data (issue 25): the built-in set at 1k images and 32 px, the cpu preset's StyleGAN2 at reproduction (c)'s
# width (channel_base 1024, channel_max 64: G 1.07M, D 0.29M parameters, 15x cheaper per image than the preset; its D
# supports reference-attention), every arm over 3 seeds. Each run trains in segments of SEG kimg (train.py's resume is
# exact: the segments are one run); after each segment its checkpoint is scored against the FULL 50k set (as the
# limited-data papers score), appended to the run's full.jsonl; D's outputs on its training images, on --holdout
# images it never sees and on fakes (ADA Fig. 1b) and r_t go to its log.jsonl. Started again, the script resumes
# every unfinished run; each finished run's summary is committed to results/limited/ at once.
#
#   bash results/limited/run.sh                 # every pending run, JOBS at a time (default 2), one thread each
#   bash results/limited/run.sh limited-ada-s1  # one run
#   bash results/limited/run.sh plot            # the figures of the finished runs (mean +- std over seeds)
#   DRY=1 bash results/limited/run.sh           # print the commands only
#   N=5000 bash results/limited/run.sh          # the 5k-image experiment (runs named limited-n5000-...)
#
# Env: KIMG (default 200), SEG (10), N (1000 training images), HOLDOUT (512), ADA_KIMG (100), FINAL (swd10k),
# JOBS, NICE, EXTRA (flags for every run), COMMIT=0 (no commits), RUNS_DIR and RESULTS (other folders), e.g. a
# smoke test: KIMG=0.064 SEG=0.032 N=64 HOLDOUT=16 FINAL=swd2k EXTRA='--batch 16 --resolution 16 --channel-base 256
# --channel-max 32 --z-dim 32 --w-dim 32' COMMIT=0 RUNS_DIR=/tmp/r RESULTS=/tmp/s bash results/limited/run.sh limited-n64-ada-s0
set -uo pipefail
cd "$(dirname "$0")/../.."
KIMG=${KIMG:-200}
SEG=${SEG:-10}
N=${N:-1000}
HOLDOUT=${HOLDOUT:-512}   # a multiple of the batch (16)
ADA_KIMG=${ADA_KIMG:-100} # the official 500 would cap p at KIMG / 500 in these short runs; 100 is its fine-tuning speed
FINAL=${FINAL:-swd10k}
NICE=${NICE:-0}
COMMIT=${COMMIT:-1}
JOBS=${JOBS:-2}
PREFIX=limited; [ "$N" != 1000 ] && PREFIX=limited-n$N
RUNS_DIR=${RUNS_DIR:-runs/$PREFIX}
RESULTS=${RESULTS:-results/$PREFIX}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# lr constant (the cpu preset's), so that segments and a longer KIMG continue the same run; in-loop metrics against
# the N training images (memorisation shows there first) every SEG kimg, with the D-overfitting diagnostics
BASE="--cfg cpu --channel-base 1024 --channel-max 64 --max-images $N --holdout $HOLDOUT --metrics swd2k,di2k --metrics-kimg $SEG --snap-kimg $SEG --keep 1"
BASE="$BASE --workers 1 --log-sec 60 ${EXTRA:-}"   # EXTRA: flags for every run (the last one given wins)
ADA="--aug ada --ada-kimg $ADA_KIMG"
declare -A ARM=(
  [$PREFIX-baseline]=""
  [$PREFIX-diffaug]="--aug diffaug"                              # Zhao et al.: color,translation,cutout
  [$PREFIX-ada]="$ADA"                                           # Karras et al.: bgc, target 0.6
  [$PREFIX-refattn]="--d-attn ref"                               # supplement Table 4: reference-attention in D
  [$PREFIX-refattn-ada]="--d-attn ref $ADA"
  [$PREFIX-contrastive]="--loss contrastive"                     # supplement Table 7 (warm-up: 20 epochs)
  [$PREFIX-contrastive-ada]="--loss contrastive $ADA"
)
ORDER="baseline diffaug ada refattn refattn-ada contrastive contrastive-ada"
RUNS=""
for s in 0 1 2; do for a in $ORDER; do RUNS="$RUNS $PREFIX-$a-s$s"; done; done   # seeds interleaved

if [ "${1:-}" = plot ]; then  # figures of the runs so far: curves with seed bands (arms without runs left out)
  logs() { ls $RUNS_DIR/$PREFIX-$1-s*/$2 2>/dev/null; }
  mkdir -p $RESULTS
  for group in "baseline diffaug ada" "baseline refattn refattn-ada" "baseline contrastive contrastive-ada"; do
    full=$(for a in $group; do logs $a full.jsonl; done)
    [ -n "$full" ] && python metrics.py --plot $full --seeds --keys swd2k/avg --title "SWD vs the full set ($N training images)" \
      --out $RESULTS/$(echo $group | tr ' ' '_')-swd.png
  done
  for a in $ORDER; do
    [ -z "$(logs $a log.jsonl)" ] && continue
    python metrics.py --plot $(logs $a log.jsonl) --seeds --keys overfit --title "$a: D on training / held-out reals, fakes" \
      --out $RESULTS/$a-overfit.png
    python metrics.py --plot $(logs $a log.jsonl) --seeds --keys ada --title "$a: r_t (and p)" --out $RESULTS/$a-rt.png
  done
  python metrics.py --table $RESULTS/$PREFIX-*.json --keys full/$FINAL/avg,swd2k/avg,overfit/train,overfit/heldout,overfit/fake
  exit 0
fi
[ $# -gt 0 ] && RUNS="$*"

source results/driver.sh   # done_kimg, commit, run_pending

score() {  # the run's latest checkpoint against the whole built-in set (50k images of its seed) -> one line of full.jsonl
  local dir=$1 metric=$2 ckpt=$(ls $1/ckpt-*.pt | tail -1)
  local res=$(nice -n "$NICE" python metrics.py $ckpt --metrics $metric --max-images 50000 --seed 1) || return 1
  python -c "import json, sys, torch
ck = torch.load(sys.argv[1], map_location='cpu', weights_only=True)
print(json.dumps(dict(kimg=round(ck['nimg'] / 1000, 3), step=ck['step'], metrics=json.loads(sys.argv[2]))))" $ckpt "$res"
}

scored() {  # whether full.jsonl holds a score at this kimg
  python -c "import json, sys
sys.exit(not any(abs(json.loads(l)['kimg'] - float(sys.argv[2])) < 1e-6 for l in open(sys.argv[1])))" $1/full.jsonl $2 2>/dev/null
}

one() {  # one run to KIMG in segments of SEG, each scored against the full set; then its summary
  local name=$1 arm=${1%-s*} seed=${1##*-s}
  [ -n "${ARM[$arm]+x}" ] || { echo "unknown run $name (arms: ${!ARM[*]})" >&2; return 1; }
  local dir=$RUNS_DIR/$name
  local segs=$(python -c "import math; print(' '.join(f'{min(float($KIMG), $SEG * i):g}' for i in range(1, math.ceil(round($KIMG / $SEG, 6)) + 1)))")
  if [ -n "${DRY:-}" ]; then
    for k in $segs; do echo "python train.py $BASE ${ARM[$arm]} --seed $seed --kimg $k --out $dir" | tr -s ' '; done
    return 0
  fi
  mkdir -p $dir
  for k in $segs; do
    scored $dir $k && continue  # this segment is trained and scored
    echo "$(date '+%F %T') $name to $k kimg" >&2
    nice -n "$NICE" python train.py $BASE ${ARM[$arm]} --seed $seed --kimg $k --out $dir >> $dir/stdout.txt 2>&1 \
      || { echo "$(date '+%F %T') $name stopped (see $dir/stdout.txt)" >&2; return 1; }
    score $dir swd2k >> $dir/full.jsonl || return 1
  done
  mkdir -p $RESULTS
  score $dir $FINAL > $dir/final.jsonl || return 1
  python metrics.py --summary $dir/log.jsonl | python -c "import json, sys
s = json.load(sys.stdin)
full = [json.loads(line) for line in open(sys.argv[1])]
final = json.loads(open(sys.argv[2]).read())['metrics'][sys.argv[3]]
s['full'] = [dict(kimg=r['kimg'], **{'swd2k/' + k: v for k, v in r['metrics']['swd2k'].items()}) for r in full]
s['final'].update({'full/' + sys.argv[3] + '/' + k: v for k, v in final.items()})
print(json.dumps(s))" $dir/full.jsonl $dir/final.jsonl $FINAL > $RESULTS/$name.json.tmp && mv $RESULTS/$name.json.tmp $RESULTS/$name.json
  commit $RESULTS/$name.json "Limited-data run $name reached $KIMG kimg: its summary"
  echo "$(date '+%F %T') done $name" >&2
}

run_pending $RUNS
