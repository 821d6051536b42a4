# Sourced by the scripts here. Scratch folder outside the repository; COMMON = demo.py's COMMON.
export WORK=${WORK:-/tmp/a2d_seeds}
export PYTHONPATH=/work/main:/work/main/python
export COMMON="--data data --vocab-size 3000 --max-len 64 --max-tokens 2048 --lr 1e-3 --warmup-updates 100 --max-epochs 1000 --log-every 10 --save-every 0 --clip-norm 1.0 --device cpu --no-progress"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export HERE
