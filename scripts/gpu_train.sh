#!/usr/bin/env bash
# One offline call on a GPU machine: the paper's comparison with the release's presets
# (teacher 6+6, students 3+3, 4 heads, d=512): a teacher, then no-KD, word-KD and
# word-KD + A2D students for several seeds, students in parallel processes on the one
# GPU, each scored with sacrebleu on test sentences (`a2d-train compare --plan release`).
#
# The GPU image may hold other gettext catalogs than this machine, so carry the corpus
# built here (runs/ is git-ignored):
#
#     python -m a2d_trainer.cli corpus --out runs/corpus_de          # here, once
#     run(command="bash scripts/gpu_train.sh", carry=["runs/corpus_de"], timeout_s=600)
#
# Without a carried corpus it builds one from the machine's own catalogs.
# What comes back in $OUT: results.md (the table, mean ± std over seeds, the paired
# A2D - word-KD gap), results.json (every number, the plan), environment.txt and
# runs.tar.gz (every run's log.jsonl, learning curves, scores and hypotheses; no
# checkpoints). They are copied whatever happened, so a run cut short returns what it
# finished (results.* are rewritten after every wave).
#
# Knobs: A2D_MINUTES (training waves together, default 6), A2D_SEEDS (default 1,2,3),
# A2D_PARALLEL (student processes at once, default 6), A2D_DATA (default
# runs/corpus_de when present), A2D_A2D_BACKEND (default auto), A2D_EVAL_SENTENCES
# (default the plan's 500), A2D_DEADLINE_S (default 560), A2D_DEVICE (default cuda; cpu
# checks this script, very slowly), PYTHON (default python3). Nothing is downloaded or installed: the package runs
# from this checkout (PYTHONPATH); sentencepiece, sacrebleu, tqdm and matplotlib are in
# the image (/work/.library/device/KINDS.md).
set -uo pipefail
cd "$(dirname "$0")/.." || { echo "gpu_train.sh: cannot cd to the repository"; exit 0; }
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
DEST="${OUT:-runs/gpu_train-$(date -u +%Y%m%dT%H%M%S)}"
RUN="${A2D_RUN_DIR:-/tmp/a2d_gpu_train}"
mkdir -p "$DEST" "$RUN"

DATA_ARGS=()
DATA="${A2D_DATA:-runs/corpus_de}"
if [ -f "$DATA/corpus.json" ]; then
  DATA_ARGS=(--data "$DATA")
else
  echo "gpu_train.sh: no corpus at $DATA; building one from this machine's catalogs"
fi

{
  date -u +"date: %F %T UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c 'import torch, triton, sentencepiece, sacrebleu; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "sentencepiece", sentencepiece.__version__, "sacrebleu", sacrebleu.__version__)' 2>&1
  echo "A2D_MINUTES=${A2D_MINUTES:-6} A2D_SEEDS=${A2D_SEEDS:-1,2,3} A2D_PARALLEL=${A2D_PARALLEL:-6} data=$DATA backend=${A2D_A2D_BACKEND:-auto}"
} > "$DEST/environment.txt"
cat "$DEST/environment.txt"

# Keep results.* in $DEST current while it runs (a call cut at the tool's limit still
# returns the waves that finished); the deadline counts from this script's start.
copy_results() {
  for f in results.md results.json; do
    [ -f "$RUN/$f" ] && cp "$RUN/$f" "$DEST/$f.tmp" && mv "$DEST/$f.tmp" "$DEST/$f"
  done
}
( while sleep 15; do copy_results; done ) &
COPIER=$!
left=$(( ${A2D_DEADLINE_S:-560} - SECONDS ))
[ "$left" -lt 60 ] && left=60
timeout -k 10 "$left" "$PY" -m a2d_trainer.cli compare --plan release \
  --run-dir "$RUN" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} --device "${A2D_DEVICE:-cuda}" \
  --minutes "${A2D_MINUTES:-6}" --seeds "${A2D_SEEDS:-1,2,3}" --parallel "${A2D_PARALLEL:-6}" \
  --a2d-backend "${A2D_A2D_BACKEND:-auto}" ${A2D_EVAL_SENTENCES:+--eval-sentences "$A2D_EVAL_SENTENCES"}
rc=$?
kill "$COPIER" 2>/dev/null
echo "gpu_train.sh: a2d-train compare exited with $rc (124: cut at the deadline)"
copy_results

# Everything but checkpoints (hundreds of MB each, finished or cut mid-write) and the corpus.
tar -czf "$DEST/runs.tar.gz" -C "$RUN" --exclude='*.pt' --exclude='*.tmp' --exclude='./data' \
  --warning=no-file-changed . 2>/dev/null
[ $? -gt 1 ] && echo "gpu_train.sh: packing $RUN failed"
[ -f "$DEST/results.md" ] && cat "$DEST/results.md"
exit 0
