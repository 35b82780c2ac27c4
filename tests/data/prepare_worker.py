"""`trainer_sft.py` with the data preparation watched and slowed from the environment, for tests of what a job's ranks
do when they prepare data together.

- PREP_LOG=path: every call that tokenizes a chunk appends "<pid> <records>" to that file.
- PREP_SLEEP=seconds: each chunk's tokenizing first sleeps that long (a slow preparation).
- PREP_CHUNK_CHARS=n: streamed files are cut into chunks of n characters (many chunks from a small file).
- COLLECTIVE_TIMEOUT=seconds: the process group's collectives time out after that long (the default is 30 minutes).

The preparation goes in through its seams, looked up at each call: `prepare.encode_records` (the one function that
tokenizes a chunk) and `stream.CHUNK_CHARS`; the timeout through `deepspeed.init_distributed`.
"""

import datetime
import os
import sys
import time

import deepspeed

from model_training.cli import exit_process, main_train
from model_training.data import prepare
from model_training.data.sources import stream

if os.environ.get("PREP_LOG") or os.environ.get("PREP_SLEEP"):
    real_encode = prepare.encode_records

    def watched_encode(records, *args, **kwargs):
        time.sleep(float(os.environ.get("PREP_SLEEP", "0")))
        if os.environ.get("PREP_LOG"):
            with open(os.environ["PREP_LOG"], "a") as log:
                log.write(f"{os.getpid()} {len(records)}\n")
        return real_encode(records, *args, **kwargs)

    prepare.encode_records = watched_encode

if os.environ.get("PREP_CHUNK_CHARS"):
    stream.CHUNK_CHARS = int(os.environ["PREP_CHUNK_CHARS"])

if os.environ.get("COLLECTIVE_TIMEOUT"):
    real_init = deepspeed.init_distributed

    def init_with_timeout(*args, **kwargs):
        kwargs["timeout"] = datetime.timedelta(seconds=float(os.environ["COLLECTIVE_TIMEOUT"]))
        return real_init(*args, **kwargs)

    deepspeed.init_distributed = init_with_timeout

exit_process(main_train(sys.argv[1:]))
