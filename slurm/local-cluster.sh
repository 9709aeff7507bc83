#!/usr/bin/env bash
# A real single-node Slurm for tests and for trying distprobe's launcher, from Debian/Ubuntu packages.
#
#   slurm/local-cluster.sh start    install slurm-wlm, munge, slurmdbd, mariadb-server if missing; start
#                                   munged, mariadbd, slurmdbd, slurmctld, slurmd; wait until the node is idle
#   slurm/local-cluster.sh status   say which daemons run and show sinfo
#   slurm/local-cluster.sh stop     stop every daemon by the PID in its pidfile
#
# The machine needs no systemd: every daemon is started by hand and stopped by PID. Everything this script writes
# lives in one state folder, $DISTPROBE_SLURM_DIR (default /tmp/distprobe-slurm), except a symlink
# /etc/slurm/slurm.conf -> $DISTPROBE_SLURM_DIR/etc/slurm.conf so that plain `sbatch`, `srun` and `sacct` find the
# cluster; the symlink is only made where /etc/slurm/slurm.conf is absent or already ours, otherwise
# `export SLURM_CONF=$DISTPROBE_SLURM_DIR/etc/slurm.conf` is needed (the script says so).
#
# Accounting (slurmdbd + MariaDB) is on so that job states are real: without it `sacct` fails and submitit reports
# every job as UNKNOWN. `AuthInfo=cred_expire=10` makes a requeued job restart after ~11 s instead of ~2 min.
# Must run as root (it installs packages and slurmd starts jobs as their users).
set -euo pipefail

STATE_DIR="${DISTPROBE_SLURM_DIR:-/tmp/distprobe-slurm}"
DB_PORT="${DISTPROBE_SLURM_DB_PORT:-3307}"
START_TIMEOUT_S="${DISTPROBE_SLURM_START_TIMEOUT_S:-60}"
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
HOST="$(hostname -s)"
CONF="$STATE_DIR/etc/slurm.conf"
# The default socket: with AuthInfo=socket=... sacctmgr still looked here (22.05.8), so use it for everyone.
MUNGE_SOCKET=/run/munge/munge.socket.2
DB_SOCKET="$STATE_DIR/mysql/mysqld.sock"
# Order matters: start left to right, stop right to left.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { echo "local-cluster: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# munged and mariadbd drop root: their pidfiles live in folders their users own.
pidfile() {
    case "$1" in
    munged) echo "$STATE_DIR/munge/munged.pid" ;;
    mariadbd) echo "$STATE_DIR/mysql/mariadbd.pid" ;;
    *) echo "$STATE_DIR/run/$1.pid" ;;
    esac
}

# Prints the PID of a running daemon, or nothing.
running_pid() {
    local file pid
    file="$(pidfile "$1")"
    [[ -s "$file" ]] || return 0
    pid="$(tr -dc '0-9' <"$file")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    fi
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    if ((${#missing[@]} == 0)); then
        return
    fi
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them; install ${PACKAGES[*]}"
    log "installing ${missing[*]} (apt-get)"
    apt-get update -q >"$STATE_DIR/log/apt.log" 2>&1 || die "apt-get update failed; see $STATE_DIR/log/apt.log"
    # policy-rc.d or a missing init system stops the packages' own daemons from starting: that is what we want.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$STATE_DIR/log/apt.log" 2>&1 ||
        die "apt-get install ${missing[*]} failed; see $STATE_DIR/log/apt.log"
}

real_memory_mb() {
    # Leave 10% to the OS; Slurm refuses a node that reports less memory than its RealMemory.
    awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo
}

write_config() {
    local cpus mem
    cpus="$(nproc)"
    mem="$(real_memory_mb)"
    cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: one node, no cgroups, accounting through slurmdbd.
ClusterName=distprobe
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# cred_expire: a requeued job restarts after this many seconds (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=${STATE_DIR}/spool/ctld
SlurmdSpoolDir=${STATE_DIR}/spool/d
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=${STATE_DIR}/log/slurmctld.log
SlurmdLogFile=${STATE_DIR}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# The main scheduler otherwise runs every 60 s: a requeued job would wait that long after cred_expire.
SchedulerParameters=sched_interval=2,bf_interval=2
# Short waits keep requeue and cancel fast on a test machine.
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$STATE_DIR/etc/slurmdbd.conf" <<EOF
# Written by slurm/local-cluster.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=${STATE_DIR}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${DB_PORT}
StorageUser=slurm
StoragePass=distprobe
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE_DIR/etc/slurmdbd.conf"
}

link_system_config() {
    local target=/etc/slurm/slurm.conf
    mkdir -p /etc/slurm
    if [[ -L "$target" || ! -e "$target" ]]; then
        ln -sfn "$CONF" "$target"
    elif [[ "$(readlink -f "$target")" != "$CONF" ]]; then
        log "NOTE: $target belongs to another Slurm; use: export SLURM_CONF=$CONF"
    fi
}

start_munged() {
    [[ -n "$(running_pid munged)" ]] && return
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "reusing the munged already listening on $MUNGE_SOCKET (it is not ours to stop)"
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 "$STATE_DIR/munge" "$(dirname "$MUNGE_SOCKET")"
    touch "$STATE_DIR/log/munged.log"
    chown munge:munge "$STATE_DIR/log/munged.log"
    su -s /bin/sh munge -c "munged --socket='$MUNGE_SOCKET' --pid-file='$(pidfile munged)' \
        --log-file='$STATE_DIR/log/munged.log' --seed-file='$STATE_DIR/munge/munged.seed'" \
        </dev/null >>"$STATE_DIR/log/daemons.out" 2>&1 ||
        die "munged did not start; see $STATE_DIR/log/munged.log"
}

start_mariadbd() {
    [[ -n "$(running_pid mariadbd)" ]] && return
    local datadir="$STATE_DIR/mysql/data" fresh=0
    install -d -o mysql -g mysql -m 0755 "$STATE_DIR/mysql"
    if [[ ! -d "$datadir/mysql" ]]; then
        fresh=1
        mariadb-install-db --user=mysql --datadir="$datadir" --auth-root-authentication-method=socket \
            >"$STATE_DIR/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed; see $STATE_DIR/log/mariadb-install.log"
    fi
    # --no-defaults: the distribution's my.cnf points at /run/mysqld, which may not exist without systemd.
    setsid mariadbd --no-defaults --user=mysql --datadir="$datadir" --socket="$DB_SOCKET" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$(pidfile mariadbd)" \
        --log-error="$STATE_DIR/mysql/mariadb.log" --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
    local waited=0
    until mariadb --no-defaults --socket="$DB_SOCKET" -e 'SELECT 1' >/dev/null 2>&1; do
        ((waited++ < 300)) || die "mariadbd did not accept connections in 30 s; see $STATE_DIR/mysql/mariadb.log"
        sleep 0.1
    done
    if ((fresh)); then
        mariadb --no-defaults --socket="$DB_SOCKET" -e "
            CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'distprobe';
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'distprobe';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    fi
}

start_slurmdbd() {
    [[ -n "$(running_pid slurmdbd)" ]] && return
    SLURM_CONF="$CONF" slurmdbd </dev/null >>"$STATE_DIR/log/daemons.out" 2>&1 || die "slurmdbd did not start; see $STATE_DIR/log/slurmdbd.log"
    local waited=0
    # slurmctld registers the cluster with slurmdbd at start-up: slurmdbd must listen first.
    until SLURM_CONF="$CONF" sacctmgr -n list cluster >/dev/null 2>&1; do
        ((waited++ < 300)) || die "slurmdbd did not answer in 30 s; see $STATE_DIR/log/slurmdbd.log"
        sleep 0.1
    done
}

start_slurm() {
    # Redirected: a daemon holding the caller's stdout open would hang any caller that reads it to the end.
    [[ -n "$(running_pid slurmctld)" ]] || slurmctld -f "$CONF" </dev/null >>"$STATE_DIR/log/daemons.out" 2>&1 ||
        die "slurmctld did not start; see $STATE_DIR/log/slurmctld.log"
    [[ -n "$(running_pid slurmd)" ]] || slurmd -f "$CONF" </dev/null >>"$STATE_DIR/log/daemons.out" 2>&1 ||
        die "slurmd did not start; see $STATE_DIR/log/slurmd.log"
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT_S)) state=""
    while ((SECONDS < deadline)); do
        state="$(SLURM_CONF="$CONF" sinfo -h -n "$HOST" -o '%t' 2>/dev/null || true)"
        if [[ "$state" == "idle" || "$state" == "mix" || "$state" == "alloc" ]]; then
            log "node $HOST is $state; ${#DAEMONS[@]} daemons up; config $CONF"
            return
        fi
        sleep 0.2
    done
    log "node $HOST did not become idle in ${START_TIMEOUT_S} s (state: '${state:-no answer}'). Last log lines:"
    local f
    for f in slurmctld slurmd slurmdbd; do
        echo "--- $STATE_DIR/log/$f.log" >&2
        tail -n 15 "$STATE_DIR/log/$f.log" >&2 2>/dev/null || true
    done
    exit 1
}

cmd_start() {
    ((EUID == 0)) || die "must run as root (it installs packages and starts slurmd); try: sudo $0 start"
    mkdir -p "$STATE_DIR"/{etc,log,run,spool/ctld,spool/d}
    chmod 755 "$STATE_DIR"
    install_packages
    write_config
    link_system_config
    start_munged
    start_mariadbd
    start_slurmdbd
    start_slurm
    wait_idle
}

cmd_stop() {
    local i name pid waited
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name="${DAEMONS[i]}"
        pid="$(running_pid "$name")"
        [[ -n "$pid" ]] || continue
        kill -TERM "$pid"
        waited=0
        while kill -0 "$pid" 2>/dev/null && ((waited++ < 150)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name (pid $pid)"
    done
}

cmd_status() {
    local name pid all_up=0
    for name in "${DAEMONS[@]}"; do
        pid="$(running_pid "$name")"
        if [[ -n "$pid" ]]; then
            echo "$name: running (pid $pid)"
        else
            echo "$name: stopped"
            all_up=1
        fi
    done
    if ((all_up == 0)); then
        SLURM_CONF="$CONF" sinfo
    fi
    return "$all_up"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status   (state folder: $STATE_DIR, from \$DISTPROBE_SLURM_DIR)" >&2
    exit 2
    ;;
esac
