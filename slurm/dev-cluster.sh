#!/usr/bin/env bash
# A real, one-machine SLURM cluster with two nodes (n1, n2), for development and CI.
#
#   slurm/dev-cluster.sh up       install Debian's packages if missing, write a config, start the daemons
#   slurm/dev-cluster.sh down     stop the daemons (by their recorded pids) and wait for them
#   slurm/dev-cluster.sh status   exit 0 and print sinfo when the cluster answers, exit 1 otherwise
#   slurm/dev-cluster.sh env      print the line that points client commands at it: eval "$(slurm/dev-cluster.sh env)"
#
# Everything (config, state, spool, logs, pids) lives under $ORCH_SLURM_DIR (default /tmp/orch-slurm).
# Needs root (apt, slurmd). Loopback only, no munge (auth/none), no accounting database: status comes from
# squeue/scontrol. The daemons listen on all interfaces: keep this to test machines.
set -euo pipefail

DIR=${ORCH_SLURM_DIR:-/tmp/orch-slurm}
CONF=$DIR/etc/slurm.conf
NODES=(n1 n2)
CTLD_PORT=${ORCH_SLURM_PORT:-16817}
export SLURM_CONF=$CONF

say() { echo "dev-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "SLURM is not installed and installing it needs root (apt-get install slurmctld slurmd slurm-client)"
  local made_policy=0
  # Package scripts would start system services; a policy-rc.d that exits 101 stops that (never overwrite one).
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  say "installing slurmctld slurmd slurm-client (apt)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client >/dev/null
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

node_hw() {
  # "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=N": slurmd's own view,
  # else it complains that the topology changed. Memory at 95 % so a node never looks short of it.
  local line mem
  line=$(slurmd -C | head -1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  sed -e 's/^NodeName=[^ ]* //' -e "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100))/" <<<"$line"
}

write_conf() {
  mkdir -p "$DIR"/{etc,state,log,run} "${NODES[@]/#/$DIR/spool/}"
  local host hw port=17001
  host=$(hostname -s)
  hw=$(node_hw)
  {
    echo "ClusterName=orchdev"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/none"
    echo "CredType=cred/none"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "MpiDefault=none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    echo "MailProg=/bin/true"
    echo "JobRequeue=1"
    # A node set DOWN by an admin (or a test: a lost node) stays down until resumed; one that only stopped
    # answering comes back when its slurmd registers again. (2 would return any DOWN node the moment its slurmd
    # answers: on one machine, at once, so a downed node never looked lost.)
    echo "ReturnToService=1"
    echo "KillWait=5"
    echo "MinJobAge=3600"
    # A requeued job otherwise waits ~145 s in PENDING (BeginTime); with these it restarts in seconds.
    echo "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1"
    echo "AuthInfo=cred_expire=5"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    for node in "${NODES[@]}"; do
      echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$port $hw State=UNKNOWN"
      port=$((port + 1))
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } > "$CONF"
}

add_hosts() {
  # Multi-node jobs name the first node (n1) as the rendezvous host: it must resolve.
  local node
  for node in "${NODES[@]}"; do
    if ! getent hosts "$node" >/dev/null; then
      [ -w /etc/hosts ] || die "node name '$node' does not resolve and /etc/hosts is not writable"
      echo "127.0.0.1 $node" >> /etc/hosts
    fi
  done
}

start() {  # start NAME CMD...: in the foreground under setsid, pid recorded
  local name=$1; shift
  setsid "$@" >> "$DIR/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$DIR/run/$name.daemon"
}

wait_for() {  # wait_for SECONDS WHAT CMD...
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { say "$what did not come up in ${limit}s; logs in $DIR/log"; tail -n 20 "$DIR"/log/*.log >&2 || true; return 1; }
    sleep 0.5
  done
}

nodes_idle() { [ "$(sinfo -h -N -o '%N %t' | grep -c ' idle')" -ge "${#NODES[@]}" ]; }
# Up and answering, busy or not (a node that does not respond shows a '*' or a down/drain/fail/unknown state).
nodes_ok() { [ "$(sinfo -h -N -o '%t' | grep -cE '^(idle|alloc|mix|comp)$')" -ge "${#NODES[@]}" ]; }
ctld_up() { scontrol ping | grep -q UP; }

up() {
  if [ -f "$CONF" ] && ctld_up 2>/dev/null && nodes_ok 2>/dev/null; then
    say "already up ($CONF)"; return 0
  fi
  install_packages
  down_quiet
  write_conf
  add_hosts
  start slurmctld slurmctld -D -i -f "$CONF"
  wait_for 30 slurmctld ctld_up
  for node in "${NODES[@]}"; do start "slurmd-$node" slurmd -D -N "$node" -f "$CONF"; done
  wait_for 60 "slurmd (${NODES[*]})" nodes_idle
  say "up: ${NODES[*]} idle; clients need SLURM_CONF=$CONF"
}

down_quiet() {
  local f pid
  for f in "$DIR"/run/*.daemon; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

down() { down_quiet; say "down"; }

status() {
  [ -f "$CONF" ] || { say "not set up ($CONF missing)"; return 1; }
  ctld_up || { say "slurmctld does not answer"; return 1; }
  sinfo -N -o '%N %P %t %c'
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
