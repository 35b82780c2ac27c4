#!/usr/bin/env bash
# The main job on the bundled tiny model and data, on any machine (2 CPU ranks when there is no GPU):
# install, train (checkpoints in runs/tiny-falcon), export the last checkpoint, generate from the export.
#
#   bash scripts/quickstart.sh [LAUNCHER OPTIONS --] [TRAINER OVERRIDES]
#
# Options before a `--` go to the deepspeed launcher, the rest to trainer_sft.py (with no `--`, every argument
# is the trainer's):
#   bash scripts/quickstart.sh max_steps=20                            # trainer overrides only
#   bash scripts/quickstart.sh --master_port 29600 --num_gpus 1 -- max_steps=20
# Without --master_port a free port is picked, so another job holding 29500 (the launchers' default) does not
# stop the run. The launcher logs warnings only (--log_level info: all of its lines). NPROC (default 2) is the
# number of ranks; a --num_gpus given here wins.
source "$(dirname "$0")/setup_env.sh"
RUN=runs/tiny-falcon
EXPORT=runs/tiny-falcon-export
NPROC=${NPROC:-2}

source scripts/launch_args.sh "$@"
# The launcher's INFO lines (its environment, each rank's command) only on request: --log_level info.
case " ${LAUNCHER[*]} " in
    *" --log_level"* | *" --quiet"* | *" -q "*) ;;
    *) LAUNCHER=(--log_level warning "${LAUNCHER[@]}") ;;
esac

# A demo run: each quick start replaces the last one (overwrite_output_dir), where a real run would refuse.
deepspeed --num_gpus "$NPROC" "${LAUNCHER[@]}" trainer_sft.py --configs defaults tiny-falcon oasst-sample \
    output_dir="$RUN" overwrite_output_dir=true "${TRAINER[@]}"
python export_model.py "$RUN" --dtype bf16 --output_folder "$EXPORT" --max_shard_size 2GB --overwrite
echo "The tiny model (2 layers, random weights trained for half a minute on 246 conversations) answers nonsense on"
echo "purpose: the answers show that training, export and generation work, not what a real model says."
python -m model_training.generate "$EXPORT" "What is the capital of France?" "What is 3 plus 4?"
echo "metrics: $RUN/metrics.jsonl   checkpoints: $RUN/checkpoint-*   export: $EXPORT"
# The environment ends with this script; the README's commands run inside it.
echo "next: source ${VENV:-.venv}/bin/activate   (once per shell; then the README's commands run as written)"
