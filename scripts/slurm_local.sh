#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing nodebench's Slurm sweeps
# (tests/test_slurm.py). Sandbox-friendly: no cgroups (proctrack/linuxproc, task/none, no job
# accounting), slurmctld + slurmd + munged on localhost, all state under one folder.
#
#   scripts/slurm_local.sh start    # write the configs, start munged, slurmctld, slurmd; wait for the node
#   scripts/slurm_local.sh status   # sinfo
#   scripts/slurm_local.sh stop     # stop the three daemons started by `start` (by their pid files)
#   scripts/slurm_local.sh env      # print `export SLURM_CONF=...` for sbatch/squeue in this shell
#
# Needs the Debian packages slurm-wlm and munge (apt-get install -y slurm-wlm munge) and root
# (slurmd runs jobs as the submitting user). State folder: $NODEBENCH_SLURM_DIR
# (default /tmp/nodebench-slurm). Exit status 0 once the node is idle and a test job ran.
set -euo pipefail

DIR=${NODEBENCH_SLURM_DIR:-/tmp/nodebench-slurm}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
NODE=$(hostname -s)
CPUS=$(nproc --all)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

write_configs() {
    mkdir -p "$DIR"/{munge,state,spool,log}
    chmod 700 "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    cat > "$CONF" <<EOF
# Written by scripts/slurm_local.sh: a one-node sandbox cluster (no cgroups, no accounting).
ClusterName=nodebench
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPort=${NODEBENCH_SLURMCTLD_PORT:-6817}
SlurmdPort=${NODEBENCH_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# requeue of pre-empted/timed-out jobs (submitit's checkpointing) needs this on
JobRequeue=1
KillWait=10
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    command -v slurmctld >/dev/null || { echo "slurm_local: slurmctld not found (apt-get install -y slurm-wlm munge)" >&2; exit 3; }
    write_configs
    export SLURM_CONF=$CONF
    if ! running "$DIR/munge/munged.pid"; then
        munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
               --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
               --seed-file="$DIR/munge/munged.seed"
    fi
    running "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
    running "$DIR/slurmd.pid" || slurmd -f "$CONF"
    for _ in $(seq 60); do
        state=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
        if [[ $state == idle* || $state == mix* || $state == alloc* ]]; then
            srun -N1 -n1 -t 1 true
            echo "slurm_local: node $NODE $state ($CPUS CPUs, ${MEM_MB} MB); export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 1
    done
    echo "slurm_local: node did not come up (state '${state:-none}'); logs in $DIR/log" >&2
    tail -n 5 "$DIR"/log/*.log >&2 || true
    exit 1
}

stop() {
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
    done
    echo "slurm_local: stopped"
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF=$CONF sinfo ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
