#!/usr/bin/env bash
# Score a folder in 8 shards on a Slurm cluster, then merge the parts into one file.
#
#   sbatch examples/scale/slurm_score.sh MODEL_DIR IMAGE_FOLDER OUT_DIR
#
# Each array task scores the images whose path hashes to its index (`--shard auto`
# reads SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT), so no task needs a file list
# and a task that is rerun scores the same images again. The merge job runs after all
# of them and checks that no image was scored twice.
#SBATCH --job-name=aadetect-score
#SBATCH --array=0-7
#SBATCH --cpus-per-task=4
#SBATCH --mem=4G
#SBATCH --time=02:00:00
#SBATCH --output=%x-%A_%a.log
set -euo pipefail
model=${1:?model folder}
images=${2:?folder of images}
out=${3:?folder for the parts}
mkdir -p "$out"

# every task must see the same paths: give the folder as the same string everywhere
status=0
aadetect score "$images" --model "$model" --shard auto --format jsonl --quiet \
  > "$out/part-${SLURM_ARRAY_TASK_ID}.jsonl" || status=$?
# 1 only means "some image is anomalous": the part is complete
if [ "$status" -gt 1 ]; then exit "$status"; fi

# the last task to finish does not know it is last: submit the merge as its own job, once, e.g.
#   sbatch --dependency=afterok:$ARRAY_JOB_ID --wrap \
#     "aadetect merge $out/part-*.jsonl > $out/scores.jsonl; test \$? -le 1"
