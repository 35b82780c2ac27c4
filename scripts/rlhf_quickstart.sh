#!/usr/bin/env bash
# Every stage on the bundled tiny model and data, on any machine (2 CPU ranks when there is no GPU), each from the one
# before: SFT (runs/tiny-falcon), a reward model from it (runs/tiny-rm), DPO from it (runs/tiny-dpo), PPO from both
# (runs/tiny-ppo); each exported (RUN-export) and asked a question (the reward model scores two answers).
#   bash scripts/rlhf_quickstart.sh [LAUNCHER OPTIONS --] [OVERRIDES]
# As quickstart.sh: options before a `--` go to the deepspeed launcher (default: a free --master_port), the rest to
# every stage's trainer (e.g. data_cache_dir=DIR); with no `--`, every argument is the trainers'.
#   RUNS  the folder of the four runs and their exports (default runs); NPROC  ranks (default 2)
# Installs like quickstart.sh, unless the active environment already has the project. Each run of this script
# replaces the runs of the last one (overwrite_output_dir), where a real run would refuse.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! python -c "import deepspeed, model_training" 2>/dev/null; then
    source "$ROOT/scripts/setup_env.sh"
fi
cd "$ROOT"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false
if [ -z "${DS_ACCELERATOR:-}" ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export DS_ACCELERATOR=cpu
fi
RUNS=${RUNS:-runs}
NPROC=${NPROC:-2}
source scripts/launch_args.sh "$@"
LAUNCHER=(--num_gpus "$NPROC" "${LAUNCHER[@]}")
SFT=$RUNS/tiny-falcon RM=$RUNS/tiny-rm DPO=$RUNS/tiny-dpo PPO=$RUNS/tiny-ppo
QUESTION="What is the capital of France?"

deepspeed "${LAUNCHER[@]}" trainer_sft.py --configs defaults tiny-falcon oasst-sample output_dir="$SFT" \
    overwrite_output_dir=true "${TRAINER[@]}"
deepspeed "${LAUNCHER[@]}" trainer_rm.py --configs defaults-rm tiny-falcon preference-sample tiny-rm \
    model_name="$SFT" output_dir="$RM" overwrite_output_dir=true "${TRAINER[@]}"
deepspeed "${LAUNCHER[@]}" trainer_dpo.py --configs defaults-dpo tiny-falcon preference-sample tiny-dpo \
    model_name="$SFT" output_dir="$DPO" overwrite_output_dir=true "${TRAINER[@]}"
deepspeed "${LAUNCHER[@]}" trainer_rl.py --configs defaults tiny-falcon oasst-sample tiny-ppo \
    model_name="$SFT" ppo.reward_model="$RM" output_dir="$PPO" overwrite_output_dir=true "${TRAINER[@]}"

for run in "$SFT" "$RM" "$DPO" "$PPO"; do
    python export_model.py "$run" --dtype bf16 --output_folder "$run-export" --overwrite
done
for chat in "$SFT" "$DPO" "$PPO"; do
    echo "== $chat-export"
    python -m model_training.generate "$chat-export" "$QUESTION" --max_new_tokens 16
done
echo "== $RM-export"
python - "$RM-export" "$QUESTION" <<'EOF'
import sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, question = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
for answer in ("Paris.", "I like bread."):
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
    print(f"reward of {answer!r}: {model(**ids).logits.item():.3f}")
EOF
echo "runs: $SFT $RM $DPO $PPO (each with metrics.jsonl and training_curves.png); exports: RUN-export"
