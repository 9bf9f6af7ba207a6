#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for hessov's Slurm tests and for trying the
# measure stage locally (sbatch, job arrays, dependencies, squeue, sacct, submitit).
#
#   bash slurm/local-cluster.sh start    # idempotent; last stdout line: export SLURM_CONF=...
#   bash slurm/local-cluster.sh status   # exit 0 if slurmctld, slurmd and accounting answer
#   bash slurm/local-cluster.sh stop     # cancel jobs, stop every daemon we started, wait
#   bash slurm/local-cluster.sh stop --force   # ... even while a test session is using it
#
#   eval "$(bash slurm/local-cluster.sh start)"   # progress goes to stderr, so this works
#
# Needs root on Debian (bookworm: Slurm 22.05, munge 0.5, MariaDB 10.11). Missing packages
# are installed with apt-get. Everything the cluster writes lives under one directory:
#   HESSOV_SLURM_BASE  (default /tmp/hessov-slurm)  configs, state, logs, database, pid files
#   HESSOV_SLURM_PORT  (default 6817)               slurmctld; slurmd +1, slurmdbd +2, MariaDB +3
#
# The cluster is self-contained: its own munged (own key and socket) and its own MariaDB
# (own data directory, socket and port), so it neither needs nor disturbs a system-wide munge
# or MariaDB, and `stop` only ever stops processes recorded in pid files under the base.
#
# Daemons started from a login/CI session end with that session: CI must run `start` itself
# (the pytest fixture tests/slurm_cluster.py does).
set -euo pipefail

BASE=${HESSOV_SLURM_BASE:-/tmp/hessov-slurm}
PORT=${HESSOV_SLURM_PORT:-6817}
CTLD_PORT=$PORT
SLURMD_PORT=$((PORT + 1))
DBD_PORT=$((PORT + 2))
DB_PORT=$((PORT + 3))
CLUSTER=hessov
NODE=localhost
export SLURM_CONF=$BASE/slurm.conf # slurmdbd looks for slurmdbd.conf next to this file

MUNGE_DIR=$BASE/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
DB_DATA=$BASE/mysql
DB_RUN=$BASE/mysql-run
DB_SOCKET=$DB_RUN/mysqld.sock
LOG=$BASE/log
# Test sessions (tests/slurm_cluster.py) hold a shared flock on this file while they use the
# cluster, so that nobody stops it under their jobs (see cmd_stop).
USERS_LOCK=$BASE/users.lock

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

say() { echo "local-cluster: $*" >&2; }
die() {
    echo "local-cluster: error: $*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Helpers

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds; fail after SECONDS.
wait_for() {
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "timed out after ${limit}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

# alive PIDFILE NAME: the pid file names a live process whose command is NAME. Checking the
# name guards against a stale pid file whose number now belongs to an unrelated process.
alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$name" ]]
}

# Show the end of a log after a failure, so the reason is on screen (and in CI logs).
show_log() {
    local f=$1
    [[ -f $f ]] || return 0
    say "last lines of $f:"
    tail -n 25 "$f" >&2 || true
}

# Probes. Each Slurm client call is wrapped in `timeout`: with a daemon down, the clients retry
# for up to MessageTimeout, and no probe may hang a caller.
munge_ok() { munge -S "$MUNGE_SOCKET" -n </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }
db() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot; } # SQL on stdin
db_ok() { timeout 10 mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e 'select 1' >/dev/null 2>&1; }
dbd_ok() { timeout 10 sacctmgr -n show cluster >/dev/null 2>&1; }
sacct_ok() { timeout 10 sacct -n -X --starttime=now >/dev/null 2>&1; }
# The node answers and can take jobs. A fresh start shows "idle"; a second `start` while jobs
# run sees mixed/allocated, which is just as usable. A trailing '*' (not responding), down,
# drained or invalid states do not match.
node_ok() {
    local state
    state=$(timeout 10 sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1) || return 1
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}

# port_free PORT WHO: nothing listens on 127.0.0.1:PORT yet (bash's /dev/tcp: no ss/netstat
# needed). Checked before each daemon starts, because a taken port otherwise shows up only as a
# daemon that never answers (e.g. another Slurm cluster on the default ports).
port_free() {
    if timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; then
        die "port $1 (for $2) is taken by another process; choose other ports with
  HESSOV_SLURM_PORT=<first port> (this cluster uses it and the three after it)"
    fi
}

need_root() {
    ((EUID == 0)) || die "must run as root (e.g. sudo bash $0 ${1:-start}): the daemons run as
  root and missing packages are installed with apt-get"
}

# ---------------------------------------------------------------------------------------------
# Packages

install_packages() {
    local missing=() p status
    command -v dpkg-query >/dev/null ||
        die "dpkg is not available: this script needs Debian (bookworm) packages of Slurm"
    for p in "${PACKAGES[@]}"; do
        # `dpkg -s` also succeeds for removed-but-not-purged packages ("config-files"), so
        # ask for the exact state.
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $status == installed ]] || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null ||
        die "apt-get is not available to install: ${missing[*]} (run on Debian bookworm)"
    say "installing Debian packages: ${missing[*]}"
    # Bounded: apt-get itself does not wait on locks by default, and `timeout` caps a
    # stalled download.
    timeout 300 apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >"$BASE/apt-install.log" 2>&1 || {
        show_log "$BASE/apt-install.log"
        die "apt-get install failed"
    }
}

# ---------------------------------------------------------------------------------------------
# Configuration

# replace_if_changed NEW TARGET: configs are written to a temporary file and moved, so a daemon
# never reads half a file. A running daemon keeps the config it started with: say so when a
# second `start` (e.g. with a different HESSOV_SLURM_PORT) would change it.
replace_if_changed() {
    local new=$1 target=$2
    if [[ -f $target ]] && cmp -s "$new" "$target"; then
        rm -f "$new"
        return 0
    fi
    if [[ -f $target ]] && alive "$BASE/slurmctld.pid" slurmctld; then
        say "note: $(basename "$target") changed; running daemons use the old one until stop + start"
    fi
    mv "$new" "$target"
}

write_slurm_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    # Leave 15% of the RAM to the OS and the daemons.
    mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 85 / 100 / 1024))
    cat >"$SLURM_CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh; rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# Everything runs as root (the script requires root), so no file under the base needs to be
# owned by the 'slurm' user.
SlurmUser=root
SlurmdUser=root

# Our own munged, on a socket under the base (see start_munge).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET

# No cgroups: containers and CI runners often lack a delegated cgroup tree, and slurmd
# refuses to start when the cgroup plugins cannot set up.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# There is no mail program in minimal images; slurmctld checks that MailProg exists.
MailProg=/bin/true

# Accounting through slurmdbd: without it sacct answers "accounting storage is disabled",
# and submitit then sees every job's state as UNKNOWN.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
AccountingStoragePort=$DBD_PORT
# Connections to slurmdbd take their munge socket from here, not from AuthInfo (Slurm's
# provision for a separate munged between clusters); without it they try the system socket.
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none

SchedulerType=sched/backfill
# By default the scheduler batches submissions and waits between passes, which shows up as
# gaps of seconds between short jobs; a test cluster wants them started at once.
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
# Cores and memory are the consumable resources, so jobs share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that asks for no memory would otherwise be given the whole node's memory, and jobs
# would run one at a time however many CPUs are free. Each CPU gets its share instead.
# (Only bookkeeping: without cgroups nothing enforces it.)
DefMemPerCPU=$((mem_mb / cpus))
# After a stop/start the node comes back DOWN ("not responding"); return it to service as
# soon as its slurmd registers.
ReturnToService=2

StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log

# The node is called localhost rather than by the host name: the host name does not always
# resolve (containers), localhost does. slurmd is started with -N $NODE to match.
NodeName=$NODE CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    replace_if_changed "$SLURM_CONF.tmp" "$SLURM_CONF"
}

write_slurmdbd_conf() {
    local f=$BASE/slurmdbd.conf
    # Created with mode 600 before the password goes in: slurmdbd refuses to start with a
    # config that other users can read, as it holds the database password.
    (
        umask 077
        cat >"$f.tmp" <<EOF
# Written by slurm/local-cluster.sh; rewritten on every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$NODE
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$BASE/slurmdbd.pid
StorageType=accounting_storage/mysql
# TCP on the loopback: slurmdbd.conf has no setting for a database socket path, and our
# MariaDB does not use the system socket.
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(<"$BASE/db-password")
StorageLoc=slurm_acct_db
EOF
    )
    chmod 600 "$f.tmp"
    replace_if_changed "$f.tmp" "$f"
}

# ---------------------------------------------------------------------------------------------
# Daemons

start_munge() {
    # munged runs as user munge and insists that its key, socket directory, log, pid and
    # seed files belong to that user and are not writable by others.
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR" # clients (any user submitting jobs) must reach the socket
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        # Our own key: credentials of this cluster mean nothing to any other munged.
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key.tmp")
        chown munge:munge "$MUNGE_DIR/munge.key.tmp"
        chmod 400 "$MUNGE_DIR/munge.key.tmp"
        mv "$MUNGE_DIR/munge.key.tmp" "$MUNGE_DIR/munge.key"
    fi
    if munge_ok; then
        return 0
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" # left by a munged that was killed
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$LOG/munged.out" 2>&1 9>&- ||
        {
            show_log "$MUNGE_DIR/munged.log"
            die "munged did not start"
        }
    wait_for 15 munged munge_ok || {
        show_log "$MUNGE_DIR/munged.log"
        die "munged does not answer"
    }
}

start_mariadb() {
    # mariadbd runs as user mysql and dies silently unless the directories for its data,
    # pid file, socket and error log belong to that user.
    mkdir -p "$DB_DATA" "$DB_RUN"
    chown mysql:mysql "$DB_DATA" "$DB_RUN"
    if [[ ! -d $DB_DATA/mysql ]]; then
        say "initialising the accounting database in $DB_DATA"
        # --no-defaults everywhere: the system's /etc/mysql settings (datadir, socket,
        # pid file) belong to the system MariaDB, not to ours. Root logs in through the
        # unix socket as the unix user root, so no root password exists anywhere.
        timeout 120 mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DATA" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install.log" 2>&1 || {
            show_log "$LOG/mariadb-install.log"
            die "mariadb-install-db failed"
        }
    fi
    if ! db_ok; then
        port_free "$DB_PORT" MariaDB
        say "starting MariaDB on 127.0.0.1:$DB_PORT"
        # setsid: mariadbd does not daemonize itself; this detaches it from the caller's
        # terminal and process group, so Ctrl-C on a test run does not kill it.
        # innodb-lock-wait-timeout=900 as Slurm recommends: slurmdbd exits on a lock-wait
        # timeout. A small buffer pool: the accounting database of a test cluster is tiny.
        setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DATA" \
            --socket="$DB_SOCKET" --pid-file="$DB_RUN/mariadb.pid" \
            --log-error="$DB_RUN/mariadb.err" \
            --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
            --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
            </dev/null >/dev/null 2>&1 9>&- &
        wait_for 60 MariaDB db_ok || {
            show_log "$DB_RUN/mariadb.err"
            die "MariaDB does not answer"
        }
    fi
    # The database password is made once per base directory and kept with mode 600.
    if [[ ! -s $BASE/db-password ]]; then
        (umask 077 && head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$BASE/db-password")
    fi
    # 127.0.0.1 and not localhost: slurmdbd comes in over TCP, and MariaDB reserves the
    # name localhost for socket logins. ALTER keeps the password in step with the file.
    db <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(<"$BASE/db-password")';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
    if ! alive "$BASE/slurmdbd.pid" slurmdbd; then
        port_free "$DBD_PORT" slurmdbd
        say "starting slurmdbd"
        slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 9>&- || {
            show_log "$LOG/slurmdbd.log"
            die "slurmdbd did not start"
        }
    fi
    # The first start creates the accounting tables, which takes a few seconds.
    wait_for 60 slurmdbd dbd_ok || {
        show_log "$LOG/slurmdbd.log"
        die "slurmdbd does not answer"
    }
    # The cluster must exist in the database before slurmctld registers with it. sacctmgr
    # finds slurmdbd through slurm.conf, which is why slurm.conf is written first.
    if ! timeout 10 sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null ||
            die "sacctmgr could not add cluster $CLUSTER"
    fi
}

start_slurm() {
    if ! alive "$BASE/slurmctld.pid" slurmctld; then
        port_free "$CTLD_PORT" slurmctld
        say "starting slurmctld"
        slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1 9>&- || {
            show_log "$LOG/slurmctld.log"
            die "slurmctld did not start"
        }
    fi
    if ! alive "$BASE/slurmd.pid" slurmd; then
        port_free "$SLURMD_PORT" slurmd
        say "starting slurmd"
        # -N: slurmd would otherwise look for a node named after the host name.
        slurmd -N "$NODE" </dev/null >>"$LOG/slurmd.out" 2>&1 9>&- || {
            show_log "$LOG/slurmd.log"
            die "slurmd did not start"
        }
    fi
    wait_for 60 "node $NODE to be idle" node_ok || {
        timeout 10 sinfo -N >&2 || true
        show_log "$LOG/slurmctld.log"
        show_log "$LOG/slurmd.log"
        die "the node did not come up"
    }
    wait_for 30 "sacct to answer" sacct_ok || {
        show_log "$LOG/slurmdbd.log"
        die "sacct does not answer"
    }
}

cmd_start() {
    need_root start
    local t0=$SECONDS
    mkdir -p "$BASE" "$BASE/state" "$BASE/spool" "$LOG"
    chmod 755 "$BASE"
    # One start or stop at a time (e.g. two test sessions starting together); bounded. Every
    # daemon is started with fd 9 closed (9>&-): a daemon that inherited it would hold the
    # lock for as long as it runs, and the next start or stop would wait for nothing.
    exec 9>"$BASE/.lock"
    flock -w 300 9 || die "another start/stop holds $BASE/.lock"
    install_packages
    write_slurm_conf
    start_munge
    start_mariadb
    write_slurmdbd_conf
    start_slurmdbd
    start_slurm
    timeout 10 sinfo >&2 || true
    say "up in $((SECONDS - t0)) s (base $BASE)"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# stop_daemons NAME:PIDFILE...: SIGTERM to all of them together, wait (bounded) for all to exit,
# SIGKILL any that are left. Together, because each takes a second or two to shut down.
stop_daemons() {
    local entry name pidfile pid i left
    local -a pids=() names=()
    for entry in "$@"; do
        name=${entry%%:*}
        pidfile=${entry#*:}
        if alive "$pidfile" "$name"; then
            pid=$(<"$pidfile")
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$name")
        fi
        rm -f "$pidfile"
    done
    ((${#pids[@]})) || return 0
    for ((i = 0; i < 150; i++)); do # 30 s: MariaDB flushes InnoDB on the way down
        left=0
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && left=1
        done
        ((left)) || break
        sleep 0.2
    done
    for i in "${!pids[@]}"; do
        pid=${pids[$i]}
        if kill -0 "$pid" 2>/dev/null; then
            say "${names[$i]} ($pid) ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 25; i++)); do
        left=0
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && left=1
        done
        ((left)) || break
        sleep 0.2
    done
    ((left)) && die "could not stop: ${names[*]} (pids ${pids[*]})"
    say "stopped ${names[*]}"
}

# Job processes outlive slurmd by design (slurmstepd and the job's own processes are not
# children of it), so stopping the daemons alone could leave jobs running with no cluster.
# First cancel the jobs while the controller answers: they get SIGTERM and a moment to end.
stop_jobs() {
    local jobs
    alive "$BASE/slurmctld.pid" slurmctld || return 0
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    [[ -n $jobs ]] || return 0
    say "cancelling jobs: ${jobs//$'\n'/ }"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    # shellcheck disable=SC2016 # expanded by the inner bash, on each poll
    wait_for 10 "cancelled jobs to end" \
        bash -c '[[ -z $(timeout 10 squeue -h -t R,CG,S -o %A) ]]' || true
}

# Then SIGKILL whatever is left of this cluster's jobs: processes whose environment names our
# SLURM_CONF and that are either a slurmstepd or part of a job (SLURM_JOB_ID set). Job processes
# are killed, not just their slurmstepd, which would only orphan them. This script and its
# callers (which may also have our SLURM_CONF) are spared.
kill_leftover_jobs() {
    local keep=" " p=$$ dir pid env comm
    while [[ -n $p && $p != 0 && $p != 1 ]]; do
        keep+="$p "
        p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null) || break
    done
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        [[ $keep == *" $pid "* ]] && continue
        # Processes may end while we look: unreadable ones are skipped.
        env=$({ tr '\0' '\n' <"$dir/environ"; } 2>/dev/null) || continue
        comm=$({ cat "$dir/comm"; } 2>/dev/null) || continue
        grep -qxF "SLURM_CONF=$SLURM_CONF" <<<"$env" || continue
        if [[ $comm == slurmstepd ]] || grep -q '^SLURM_JOB_ID=' <<<"$env"; then
            say "killing leftover job process $pid ($comm)"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

cmd_stop() {
    local force=0
    [[ ${1:-} == --force ]] && force=1
    need_root stop
    if [[ ! -d $BASE ]]; then
        say "nothing to stop ($BASE does not exist)"
        return 0
    fi
    exec 9>"$BASE/.lock"
    flock -w 300 9 || die "another start/stop holds $BASE/.lock"
    # Held exclusively until the end of the stop: a test session that comes along meanwhile
    # waits, then finds the cluster stopped and starts it again.
    exec 8>>"$USERS_LOCK"
    if ! flock -n -x 8; then
        [[ $force == 1 ]] || die "a test session is using the cluster (it holds $USERS_LOCK);
  stopping now would strand its jobs. Use 'stop --force' to stop it anyway."
        say "stopping although a test session holds $USERS_LOCK (--force)"
    fi
    stop_jobs
    kill_leftover_jobs
    # Reverse order of start. slurmctld saves its state and sends its last records to slurmdbd
    # on the way down, so slurmdbd (and MariaDB and munged, which it needs) outlive it.
    stop_daemons "slurmd:$BASE/slurmd.pid" "slurmctld:$BASE/slurmctld.pid"
    stop_daemons "slurmdbd:$BASE/slurmdbd.pid"
    stop_daemons "mariadbd:$DB_RUN/mariadb.pid" "munged:$MUNGE_DIR/munged.pid"
    rm -f "$BASE/started-by-tests" # written by tests/slurm_cluster.py
    say "stopped (state, logs and database kept in $BASE)"
}

cmd_status() {
    local ok=0 down=0 name pidfile
    for name in munged:$MUNGE_DIR/munged.pid mariadbd:$DB_RUN/mariadb.pid \
        slurmdbd:$BASE/slurmdbd.pid slurmctld:$BASE/slurmctld.pid slurmd:$BASE/slurmd.pid; do
        pidfile=${name#*:}
        name=${name%%:*}
        if alive "$pidfile" "$name"; then
            say "$name running (pid $(<"$pidfile"))"
        else
            say "$name not running"
            down=1
        fi
    done
    # Ask the cluster only when all daemons run: with slurmctld down, sinfo retries for ~10 s.
    if ((!down)) && [[ -f $SLURM_CONF ]] && sacct_ok && node_ok; then
        say "cluster answers: $(timeout 10 sinfo -h -N -o '%N %T %c CPUs %m MB')"
        echo "export SLURM_CONF=$SLURM_CONF"
    else
        say "cluster does not answer (start it with: bash $0 start)"
        ok=1
    fi
    return $ok
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop "${2:-}" ;;
status) cmd_status ;;
*)
    echo "usage: $0 start | stop [--force] | status" >&2
    exit 2
    ;;
esac
