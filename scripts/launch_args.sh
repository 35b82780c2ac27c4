# Sourced by quickstart.sh and rlhf_quickstart.sh with their arguments, from the repository root: LAUNCHER holds
# the options before a `--` (for the deepspeed launcher), TRAINER the rest (for the trainers); with no `--`, every
# argument is the trainers'. Without --master_port a free port is added: another job may hold the launchers'
# default, 29500.
LAUNCHER=() TRAINER=("$@")
for ((i = 1; i <= $#; i++)); do
    if [ "${!i}" = "--" ]; then
        LAUNCHER=("${@:1:i-1}") TRAINER=("${@:i+1}")
        break
    fi
done
case " ${LAUNCHER[*]-} " in
    *" --master_port"*) ;;
    *) LAUNCHER+=(--master_port "$(python -m model_training.ports)") ;;
esac
