#!/bin/bash
# All students, at most 2 jobs at once (2 cores): xargs -P 2 over a job list (one run_student.sh
# call per line: NAME SEED OPTIONS), in order, so the two variants of a seed run side by side and
# complete pairs come first; in jobs.txt the no-KD students come last.
# usage: run_seeds.sh [JOBS_FILE]   (after run_teacher.sh; default jobs.txt = seeds 1-5;
#        jobs_extra.txt = the word / A2D pairs for seeds 6-8, run afterwards)
source "$(dirname "$0")/env.sh"
jobs=$(realpath "${1:-$HERE/jobs.txt}")
cd "$WORK"
xargs -P 2 -L 1 "$HERE/run_student.sh" < "$jobs" >> logs/queue.log 2>&1
