"""Export a checkpoint of trainer_sft.py as a Hugging Face model folder (and optionally upload it).

    python export_model.py output/ --output_folder falcon-sft --dtype bf16 --max_shard_size 2GB
    python export_model.py output/checkpoint-000080 --hf_repo_name me/falcon-sft   # token: HF_TOKEN
    python export_model.py output/falcon-sft --hf_repo_name me/falcon-sft   # upload that export again, as it is

Exit status: 0 done, 2 input that cannot be exported (nothing is written), 1 the upload failed (the local
folder is complete and kept; the error names it and the command that uploads it again).
"""

import sys

from model_training.export.cli import main_export

if __name__ == "__main__":
    sys.exit(main_export(sys.argv[1:]))
