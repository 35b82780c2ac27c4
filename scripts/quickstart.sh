#!/usr/bin/env bash
# The main job on the bundled tiny model and data, on any machine (2 CPU ranks when there is no GPU):
# install, train (checkpoints in runs/tiny-falcon), export the last checkpoint, generate from the export.
source "$(dirname "$0")/setup_env.sh"
RUN=runs/tiny-falcon
EXPORT=runs/tiny-falcon-export
NPROC=${NPROC:-2}

# A demo run: each quick start replaces the last one (overwrite_output_dir), where a real run would refuse.
deepspeed --num_gpus "$NPROC" trainer_sft.py --configs defaults tiny-falcon oasst-sample output_dir="$RUN" \
    overwrite_output_dir=true "$@"
python export_model.py "$RUN" --dtype bf16 --output_folder "$EXPORT" --max_shard_size 2GB --overwrite
python -m model_training.generate "$EXPORT" "What is the capital of France?" "What is 3 plus 4?"
echo "metrics: $RUN/metrics.jsonl   checkpoints: $RUN/checkpoint-*   export: $EXPORT"
