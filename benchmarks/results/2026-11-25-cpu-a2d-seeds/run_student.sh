#!/bin/bash
# usage: run_student.sh NAME SEED [distill options...]
# tiny-student, 360 updates (demo.py's STUDENT_UPDATES), shared teacher, --threads 1; then eval300.py.
set -e
source "$(dirname "$0")/env.sh"
cd "$WORK"
name=$1; seed=$2; shift 2
cmd="python -m a2d_trainer.cli distill $COMMON --threads 1 --run-dir runs/$name --preset tiny-student --teacher runs/teacher/checkpoint_best.pt --teacher-preset tiny-teacher --seed $seed --max-steps 360 $*"
echo "$cmd" > logs/$name.cmd
s=$(date +%s.%N)
$cmd > logs/$name.out 2> logs/$name.err
e=$(date +%s.%N)
python "$HERE/eval300.py" runs/$name > logs/$name.eval 2>> logs/$name.err
f=$(date +%s.%N)
echo "{\"train_wall_s\": $(echo "$e - $s" | bc), \"eval_wall_s\": $(echo "$f - $e" | bc), \"start\": \"$(date -d @${s%.*} +%T)\", \"end\": \"$(date -d @${f%.*} +%T)\"}" > logs/$name.time
