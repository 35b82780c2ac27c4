#!/usr/bin/env bash
# Version drift, found on purpose rather than by surprise. Installs one resolution of setup.cfg's ranges into
# a fresh virtual environment of its own, shows how it differs from the lock (scripts/constraints.txt), then
# runs ruff and the test suite there, as CI does with the lock.
#
#   bash scripts/test_versions.sh latest [pytest args]   # the newest versions the ranges admit (.venv-latest)
#   bash scripts/test_versions.sh oldest [pytest args]   # every direct requirement at its lower bound (.venv-oldest)
#   bash scripts/test_versions.sh lock [pytest args]     # refresh the lock: the newest versions, torch held at the
#                                                        # lock's CPU build; writes scripts/constraints.txt, then tests
#   ... --no-tests                                       # install, diff (and write the lock) only
#
# Each run leaves runs/versions-<mode>/ with the constraints it used, what it installed and the diff.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: scripts/test_versions.sh latest|oldest|lock [pytest args]}
shift
OUTDIR=runs/versions-$MODE
VENV=.venv-$MODE
LOCK_FILE=scripts/constraints.txt
mkdir -p "$OUTDIR"
constraints=$OUTDIR/constraints.txt

case "$MODE" in
    latest) echo "# nothing pinned: the newest versions setup.cfg admits" >"$constraints" ;;
    lock) grep -i '^torch==' "$LOCK_FILE" >"$constraints" ;;
    oldest)
        # name==lower bound for each direct requirement (install and test) that has one; the rest resolves newest.
        python3 - >"$constraints" <<'PY'
import configparser, re
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["test"].splitlines()
for line in lines:
    requirement = line.split("#")[0].replace(" ", "")
    lower = re.search(r">=([^,;]+)", requirement)
    if lower:
        print(f"{re.match(r'[A-Za-z0-9_.-]+', requirement).group(0)}=={lower.group(1)}")
PY
        ;;
    *) echo "unknown mode '$MODE': latest, oldest or lock" >&2; exit 2 ;;
esac

rm -rf "$VENV"
export VENV LOCK=$constraints
# shellcheck source=setup_env.sh
source scripts/setup_env.sh
python -m pip freeze --all --exclude-editable | grep -v '^#' >"$OUTDIR/installed.txt"
python - "$LOCK_FILE" "$OUTDIR/installed.txt" <<'PY' | tee "$OUTDIR/diff.txt"
import re, sys
def pins(path):
    found = {}
    for line in open(path):
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            found[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+")[0]  # 2.13.0+cpu is torch==2.13.0
    return found
lock, installed = pins(sys.argv[1]), pins(sys.argv[2])
changed = [f"{n} {lock.get(n, '-')} -> {installed.get(n, '-')}" for n in sorted(lock.keys() | installed.keys())
           if lock.get(n) != installed.get(n)]
print(f"{len(changed)} differences from the lock" + (":" if changed else ""))
print("\n".join(changed))
PY
if [ "$MODE" = lock ]; then
    {
        echo "# The lock: exact versions of everything CI and the README's commands install (scripts/setup_env.sh)."
        echo "# Made by 'bash scripts/test_versions.sh lock' on $(date -u +%Y-%m-%d) with Python $(python -c 'import platform; print(platform.python_version())'); do not edit by hand."
        sed 's/^torch==\([^+]*\)+.*/torch==\1/' "$OUTDIR/installed.txt"
    } >"$LOCK_FILE"
    echo "wrote $LOCK_FILE"
fi
if [ "${1:-}" = --no-tests ]; then
    exit 0
fi
ruff check .
python -m pytest -q "$@"
