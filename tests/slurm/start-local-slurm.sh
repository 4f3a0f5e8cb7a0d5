#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the `slurm`-marked tests and CI: slurmctld +
# slurmd + slurmdbd (accounting, on MariaDB: the SLURM executor plugin reads job states with
# `sacct`, and without accounting it waits forever) + munge, with two fake GPUs through GRES so that
# `--gpus=1` is accepted as on a real GPU partition.
#
#   tests/slurm/start-local-slurm.sh          install (apt-get, once), configure, start, wait until the node is idle
#   tests/slurm/start-local-slurm.sh stop     end the daemons this script started (by their pid files), nothing else
#   tests/slurm/start-local-slurm.sh status   exit 0 when the cluster answers and the node is idle
#
# For a fresh Debian 12 machine as root without systemd (CI): the daemons are started directly.
# Idempotent: a daemon whose pid file names a live process is left running; config files are
# rewritten only when their content changes. Cluster "mergevq", partition "debug", account
# "mergevq-ci" (user root), node = this host with the CPUs and memory `slurmd -C` reports.
set -euo pipefail

STATE=/var/lib/mergevq-slurm          # pid files of the daemons started here, the MariaDB data dir
LOGS=/var/log/mergevq-slurm
CLUSTER=mergevq
PARTITION=debug
ACCOUNT=mergevq-ci
DB_PASS=mergevq-slurmdbd              # local-only database user for slurmdbd
HOST=$(hostname -s)

log() { echo "[start-local-slurm] $*" >&2; }
die() { echo "[start-local-slurm] ERROR: $*" >&2; exit 1; }

alive() {  # alive NAME: the pid file of NAME names a running process
  local pidfile="$STATE/$1.pid"
  [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local t=0
  until "$@" >/dev/null 2>&1; do
    (( t++ >= limit )) && die "timed out after ${limit}s waiting for $what (logs: $LOGS)"
    sleep 1
  done
}

node_idle() { [[ $(sinfo -h -N -n "$HOST" -o %T 2>/dev/null) =~ ^(idle|mixed|allocated)$ ]]; }

stop() {
  local name pid
  for name in slurmd slurmctld slurmdbd mariadb munged; do  # reverse start order
    [[ -s $STATE/$name.pid ]] || continue
    pid=$(cat "$STATE/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping $name (pid $pid)"
      kill "$pid"
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -0 "$pid" 2>/dev/null && { log "$name did not stop in 30 s; SIGKILL"; kill -9 "$pid"; }
    fi
    rm -f "$STATE/$name.pid"
  done
}

case "${1:-start}" in
  stop) stop; exit 0 ;;
  status) node_idle && sacct -n -X -S now-1minute >/dev/null 2>&1; exit $? ;;
  start) ;;
  *) die "usage: $0 [start|stop|status]" ;;
esac

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"

# ---- install ---------------------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if (( ${#missing[@]} )); then
  command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian/Ubuntu only"
  log "installing ${missing[*]}"
  apt-get update -q >"$LOGS.apt.log" 2>&1 || { cat "$LOGS.apt.log" >&2; die "apt-get update failed"; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOGS.apt.log" 2>&1 \
    || { tail -20 "$LOGS.apt.log" >&2; die "apt-get install failed"; }
fi

mkdir -p "$STATE" "$LOGS" /etc/slurm /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld
getent hosts "$HOST" >/dev/null || { log "$HOST does not resolve; adding it to /etc/hosts"; echo "127.0.1.1 $HOST" >>/etc/hosts; }

write_if_changed() {  # write_if_changed PATH MODE (content on stdin)
  local tmp; tmp=$(mktemp)
  cat >"$tmp"
  if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 0; fi
  install -m "$2" "$tmp" "$1"; rm -f "$tmp"
  CHANGED=1
}
CHANGED=0

# ---- configuration ---------------------------------------------------------------------------
# The node as slurmd sees it, with RealMemory a little below the measured value (slurmd refuses a
# node that reports less memory than configured).
read -r CPUS MEM < <(slurmd -C | awk '/^NodeName/ {for (i = 1; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}
                                                   print v["CPUs"], v["RealMemory"]}')
[[ -n ${CPUS:-} && -n ${MEM:-} ]] || die "could not read the node's CPUs and memory from 'slurmd -C'"
MEM=$(( MEM * 9 / 10 ))

# Fake GPUs: GRES only needs device files to exist; /dev/null-like character devices.
for i in 0 1; do [[ -c /dev/mergevq-fakegpu$i ]] || mknod /dev/mergevq-fakegpu$i c 1 3; done

write_if_changed /etc/slurm/slurm.conf 644 <<EOF
# Written by tests/slurm/start-local-slurm.sh (single-node test cluster).
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire + 1 s later (default 120): shorter for test jobs.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No systemd, no cgroup v2 delegation here: track processes by parent pid, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu
# sacct shows the plugin's --comment (rule and wildcards): the tests find their jobs by it.
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
# Short test jobs: give a cancelled job 10 s to end, keep finished jobs visible to squeue 5 min.
KillWait=10
# A job that asks for no memory gets 1 GB per CPU, not the whole node.
DefMemPerCPU=1000
MinJobAge=300
ReturnToService=2
SchedulerType=sched/backfill
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM Gres=gpu:2 State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

write_if_changed /etc/slurm/gres.conf 644 <<EOF
NodeName=$HOST Name=gpu File=/dev/mergevq-fakegpu[0-1]
EOF

write_if_changed /etc/slurm/slurmdbd.conf 600 <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

if (( CHANGED )) && alive slurmctld; then
  log "configuration changed: restarting the SLURM daemons"
  for name in slurmd slurmctld slurmdbd; do
    alive $name && { kill "$(cat "$STATE/$name.pid")"; sleep 2; }
    rm -f "$STATE/$name.pid"
  done
fi

# ---- daemons ---------------------------------------------------------------------------------
if ! alive munged; then
  log "starting munged"
  chown munge:munge /run/munge
  mkdir -p "$LOGS/munge" && chown munge:munge "$LOGS/munge"
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid --log-file="$LOGS/munge/munged.log" --force
  wait_for 10 "munged's pid file" test -s /run/munge/munged.pid
  cp /run/munge/munged.pid "$STATE/munged.pid"
fi
wait_for 10 "munge to answer" bash -c 'munge -n | unmunge'

if ! alive mariadb; then
  log "starting mariadbd"
  chown mysql:mysql /run/mysqld
  mkdir -p "$LOGS/mariadb" && chown mysql:mysql "$LOGS/mariadb"
  rm -f /run/mysqld/mariadb.pid
  [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOGS/mariadb-install.log" 2>&1
  runuser -u mysql -- /usr/sbin/mariadbd --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/mariadb.pid --log-error="$LOGS/mariadb/mariadb.log" --skip-networking=0 \
    --bind-address=127.0.0.1 --innodb-buffer-pool-size=128M >/dev/null 2>&1 &
  wait_for 60 "mariadbd to answer" mariadb -u root -e "SELECT 1"
  wait_for 10 "mariadbd's pid file" test -s /run/mysqld/mariadb.pid
  cp /run/mysqld/mariadb.pid "$STATE/mariadb.pid"
fi
mariadb -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

if ! alive slurmdbd; then
  log "starting slurmdbd"
  rm -f "$STATE/slurmdbd.pid"
  /usr/sbin/slurmdbd
  wait_for 60 "slurmdbd to answer" sacctmgr -n show cluster
fi
sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -n -P show account format=account | grep -qx "$ACCOUNT" \
  || sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="mergevq tests" organization=mergevq >/dev/null
sacctmgr -n -P show assoc where user=root account="$ACCOUNT" format=account | grep -qx "$ACCOUNT" \
  || sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null

if ! alive slurmctld; then
  log "starting slurmctld"
  rm -f "$STATE/slurmctld.pid"
  /usr/sbin/slurmctld
  wait_for 60 "slurmctld to answer" scontrol ping
fi
if ! alive slurmd; then
  log "starting slurmd"
  rm -f "$STATE/slurmd.pid"
  /usr/sbin/slurmd
fi
# A node left DOWN/DRAIN by an earlier run (e.g. a killed slurmd) is returned to service.
sleep 1
[[ $(sinfo -h -N -n "$HOST" -o %T 2>/dev/null) =~ ^(down|drain|drained|draining) ]] \
  && scontrol update nodename="$HOST" state=resume 2>/dev/null || true
wait_for 90 "node $HOST to become idle" node_idle
wait_for 30 "sacct to answer" sacct -n -X -S now-1minute
log "up: cluster $CLUSTER, partition $PARTITION, account $ACCOUNT, node $HOST ($CPUS CPUs, ${MEM} MB, gpu:2 fake)"
