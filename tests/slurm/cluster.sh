#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the launch tests.
#
#   tests/slurm/cluster.sh start  DIR   install packages if missing, start everything, wait for idle nodes
#   tests/slurm/cluster.sh stop   DIR   cancel jobs, stop the daemons this script started (by pid file)
#   tests/slurm/cluster.sh status DIR   show which daemons run and the node states
#
# Daemons: munged, MariaDB (127.0.0.1 only) + slurmdbd (so that sacct works), slurmctld, and two
# slurmd "nodes" (node1, node2; Debian's build allows several slurmd per host). All state, logs,
# sockets and pid files live under DIR. Clients need `export SLURM_CONF=DIR/etc/slurm.conf`
# (written to DIR/env). Needs root and Debian's apt-get; starting twice is safe.
# Ports (defaults in brackets): MTLX_SLURMCTLD_PORT [6817], MTLX_SLURMDBD_PORT [6819],
# MTLX_SLURMD_PORTS [6828,6829], MTLX_MARIADB_PORT [3307].
set -euo pipefail

CTLD_PORT=${MTLX_SLURMCTLD_PORT:-6817}
DBD_PORT=${MTLX_SLURMDBD_PORT:-6819}
IFS=, read -r -a NODE_PORTS <<<"${MTLX_SLURMD_PORTS:-6828,6829}"
NODES=(node1 node2)
DB_PORT=${MTLX_MARIADB_PORT:-3307}
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
BINARIES=(munged slurmctld slurmd sbatch slurmdbd mariadbd mariadb-install-db)

die() { echo "cluster.sh: $*" >&2; exit 1; }

usage() { die "usage: $0 start|stop|status DIR"; }

[[ $# -eq 2 ]] || usage
CMD=$1
DIR=$(realpath -m "$2")
export SLURM_CONF=$DIR/etc/slurm.conf

# ------------------------------------------------------------------------------------------
# Packages

missing_binaries() {
    local b
    for b in "${BINARIES[@]}"; do
        PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null || echo "$b"
    done
}

install_packages() {
    [[ -z $(missing_binaries) ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "not root: cannot install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "no apt-get: cannot install ${PACKAGES[*]}"
    # The packages' init scripts would start the distro's own daemons: forbid that while
    # installing, with a policy-rc.d of our own only where there is none.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
        # shellcheck disable=SC2064  # remove it even when the install is interrupted
        trap "rm -f '$policy'" EXIT
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${PACKAGES[@]}" >/dev/null
    } || rc=$?
    if [[ $own_policy -eq 1 ]]; then rm -f "$policy"; trap - EXIT; fi
    [[ $rc -eq 0 ]] || die "apt-get install ${PACKAGES[*]} failed (exit $rc)"
    [[ -z $(missing_binaries) ]] || die "still missing after install: $(missing_binaries | xargs)"
}

# ------------------------------------------------------------------------------------------
# Configuration

write_configs() {
    local host mem
    host=$(hostname -s)
    # Two "nodes" share this machine's memory; give each a share, as slurmd checks RealMemory.
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / 4 ))
    local cpus
    cpus=$(nproc)
    mkdir -p "$DIR"/{etc,munge,log,run,pids,mysql,state/ctld}
    for n in "${NODES[@]}"; do mkdir -p "$DIR/state/slurmd/$n"; done
    chmod 755 "$DIR/munge"

    cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after cred_expire seconds (default 120).
AuthInfo=socket=$DIR/munge/munge.sock,cred_expire=10
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$DIR/munge/munge.sock
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
NodeName=${NODES[0]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[0]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[1]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

    # slurmdbd reads slurmdbd.conf beside SLURM_CONF; it must be private to SlurmUser.
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.sock
DbdAddr=127.0.0.1
DbdHost=$host
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"

    echo "export SLURM_CONF=$DIR/etc/slurm.conf" >"$DIR/env"

    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 600 "$DIR/munge/munge.key"
}

# ------------------------------------------------------------------------------------------
# Daemons: each runs in the foreground under setsid; its pid is recorded in DIR/pids/NAME.pid.

pid_of() {
    local f=$DIR/pids/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ -d /proc/$pid ]] || return 1
    # Guard against a recycled pid: the process must be the binary we started.
    grep -qa -- "$2" "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

# daemon NAME MATCH CMD...: start CMD unless NAME runs already.
daemon() {
    local name=$1 match=$2
    shift 2
    pid_of "$name" "$match" >/dev/null && return 0
    (
        # Close every inherited descriptor beyond 0-2: a daemon holding the caller's pipe
        # (pytest captures output through pipes) would keep it open forever.
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            if [[ $fd -gt 2 ]]; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1
    ) &
    echo $! >"$DIR/pids/$name.pid"
}

wait_for() {
    local what=$1 tries=$2
    shift 2
    local i
    for ((i = 0; i < tries; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "timed out waiting for $what (logs in $DIR/log)"
}

mariadb_ping() { mariadb-admin --no-defaults --socket="$DIR/run/mysql.sock" -uroot ping; }

nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
    [[ $(grep -cE ' idle$| mix$| alloc$' <<<"$states") -eq ${#NODES[@]} ]]
}

start_daemons() {
    export PATH=$PATH:/usr/sbin:/sbin
    daemon munged munged munged --foreground --force \
        --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.sock" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed"

    if [[ ! -d $DIR/mysql/mysql ]]; then
        mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root \
            --skip-test-db --auth-root-authentication-method=normal >"$DIR/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
    fi
    # A private database server for the accounting records only, reachable on 127.0.0.1.
    daemon mariadbd mariadbd mariadbd --no-defaults --user=root --datadir="$DIR/mysql" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$DIR/run/mysql.sock" \
        --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
        --skip-grant-tables --innodb-buffer-pool-size=32M --skip-log-bin
    wait_for munged 50 test -S "$DIR/munge/munge.sock"
    wait_for mariadb 150 mariadb_ping

    daemon slurmdbd slurmdbd slurmdbd -D
    wait_for slurmdbd 100 sacctmgr -i show cluster

    # A node state saved by an earlier run (DOWN, INVAL) would survive a cold restart.
    if ! pid_of slurmctld slurmctld >/dev/null; then rm -f "$DIR"/state/ctld/node_state*; fi
    daemon slurmctld slurmctld slurmctld -D
    wait_for slurmctld 100 scontrol ping
    local n
    for n in "${NODES[@]}"; do daemon "slurmd-$n" slurmd slurmd -D -N "$n"; done
    wait_for "idle nodes" 300 nodes_idle
}

start() {
    install_packages
    write_configs
    start_daemons
    echo "cluster.sh: up in $DIR (${NODES[*]} idle); export SLURM_CONF=$SLURM_CONF"
}

alive() { [[ -d /proc/$1 ]] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }

# stop_group NAME:MATCH...: TERM them all, wait up to 10 s, then KILL what is left.
stop_group() {
    local item name pid i pids=()
    for item in "$@"; do
        name=${item%%:*}
        if pid=$(pid_of "$name" "${item#*:}"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$DIR/pids/$name.pid"
    done
    for pid in "${pids[@]}"; do
        for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
}

stop() {
    [[ -d $DIR/pids ]] || { echo "cluster.sh: nothing started in $DIR"; return 0; }
    export PATH=$PATH:/usr/sbin:/sbin
    # slurmstepd outlives slurmd: cancel jobs while the controller still runs.
    if pid_of slurmctld slurmctld >/dev/null; then
        scancel --full --quiet --user=root 2>/dev/null || true
        local i
        for ((i = 0; i < 100; i++)); do
            [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    # Slurm daemons first (they report to slurmdbd, which needs the database), each group in parallel.
    stop_group slurmd-node2:slurmd slurmd-node1:slurmd slurmctld:slurmctld slurmdbd:slurmdbd
    stop_group mariadbd:mariadbd munged:munged
    echo "cluster.sh: stopped $DIR"
}

status() {
    local name match pid rc=0
    for name in munged:munged mariadbd:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld \
        slurmd-node1:slurmd slurmd-node2:slurmd; do
        match=${name#*:}
        name=${name%%:*}
        if pid=$(pid_of "$name" "$match"); then echo "$name running (pid $pid)"; else echo "$name stopped"; rc=3; fi
    done
    [[ $rc -eq 0 ]] && sinfo -N -o '%N %t %c'
    return $rc
}

case $CMD in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
