"""export_model.py's own main, run with a Python audit hook that records every write the command makes: files
opened for writing, folders made, renames and deletions. The record is the last line of stdout (JSON).

test_upload.py runs a re-upload through it: uploading a finished export as it is writes nothing at all, while
exporting it again (even into a temporary folder that is deleted afterwards) cannot avoid writes. The imports
come before the hook, so that caches the libraries set up when imported are not counted.
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "os.symlink",
                "os.link", "shutil.copyfile", "shutil.move"}
writes = []


def audit(event: str, args: tuple) -> None:
    # "open" carries (path, mode, flags) for open() and os.open() alike; a file descriptor is no new file.
    if event == "open" and not isinstance(args[0], int) and args[2] & WRITE_FLAGS:
        writes.append(f"open {args[0]}")
    elif event in WRITE_EVENTS:
        writes.append(f"{event} {args[0]}")


if __name__ == "__main__":
    # This checkout's package, as for export_model.py, whose folder (the repository's) comes first on sys.path.
    sys.path.insert(0, str(REPO))
    from model_training.export.cli import main_export

    sys.addaudithook(audit)
    status = main_export(sys.argv[1:])
    print(json.dumps(writes))
    sys.exit(status)
