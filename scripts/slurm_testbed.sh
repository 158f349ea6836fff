#!/usr/bin/env bash
# slurm_testbed.sh -- a real multi-node SLURM 22.05 cluster on ONE Debian 12 host (as root),
# for the askap_flows tests and CI.  Everything is loopback (127.0.0.1); nothing else is
# contacted.  See docs/testbed.md.
#
#   slurm_testbed.sh up              install missing packages, start munged, slurmctld, N slurmd
#                                    and a watchdog; wait until all nodes are idle; smoke test
#   slurm_testbed.sh down            cancel jobs, stop what "up" started, drop runtime state
#                                    (logs and config are kept)
#   slurm_testbed.sh status          daemons + sinfo; exit 0 only if everything is healthy
#   slurm_testbed.sh kill-node K [--slurmd-only] [--down-now]
#                                    simulate a crash of nodeK: SIGKILL its slurmd and (unless
#                                    --slurmd-only) every process on it; pauses the watchdog.
#                                    slurmctld notices after ~20 s, or at once with --down-now
#   slurm_testbed.sh revive-node K   start nodeK's slurmd again, unpause, wait until idle
#   slurm_testbed.sh stop-controller stop slurmctld (a controller restart or outage: every
#                                    SLURM command fails until start-controller); jobs keep running
#   slurm_testbed.sh start-controller start slurmctld again and wait until it answers
#   slurm_testbed.sh up-second-cluster | down-second-cluster | status-second-cluster
#                                    opt-in: a second cluster "askapfar" (own slurmctld and node,
#                                    with slurmdbd on MariaDB) for -M; the test bed's own daemons
#                                    and slurm.conf are untouched (scripts/slurm_second_cluster.sh)
#
# Knobs: ASKAP_TESTBED_DIR (/tmp/askap_testbed), ASKAP_TESTBED_NODES (3),
#        ASKAP_TESTBED_CPUS (4 per node), ASKAP_TESTBED_MEM (4000 MB per node).
# After "up":  source "$ASKAP_TESTBED_DIR/env.sh"   (SLURM_CONF, ASKAP_TESTBED_*)
set -euo pipefail

DIR=${ASKAP_TESTBED_DIR:-/tmp/askap_testbed}
NNODES=${ASKAP_TESTBED_NODES:-3}
CPUS=${ASKAP_TESTBED_CPUS:-4}
MEM=${ASKAP_TESTBED_MEM:-4000}
PARTITION=debug
CLUSTER=askaptb
CTLD_PORT=6817
NODE_PORT_BASE=17000            # nodeK listens on 127.0.0.1:$((NODE_PORT_BASE + K))
CONF=$DIR/etc/slurm.conf
RUN=$DIR/run
LOG=$DIR/log
PAUSE=$RUN/watchdog.pause       # exists -> the watchdog restarts nothing
MUNGE_SOCK=$DIR/munge/run/munge.socket
ETC_LINK=/etc/slurm/slurm.conf
SELF=$(readlink -f "${BASH_SOURCE[0]}")
# MPICH (srun --mpi=pmi2) and Open MPI with PMIx (srun --mpi=pmix) side by side; mpicc on PATH
# stays MPICH's (see pin_mpich), Open MPI is reached as mpicc.openmpi.  SLURM's mpi/pmix_v4
# plugin dlopens .../pmix2/lib/libpmix.so, which only libpmix-dev ships.
PKGS=(slurm-wlm munge mpich libmpich-dev openmpi-bin libopenmpi-dev libpmix-dev iproute2
      util-linux hostname)
PMIX_LIB=/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so

# Never let a slurm command fall back to configless mode (a DNS SRV lookup), and do not
# let a caller's job environment (salloc shell, batch job) leak into our srun/sbatch.
unset "${!SLURM_@}"
export SLURM_CONF=$CONF

log() { printf '[testbed] %s\n' "$*"; }
# die MESSAGE [LOGFILE]: print the error, the tail of LOGFILE, exit 1
die() {
  if [ -n "${2:-}" ]; then
    printf '[testbed] ERROR: %s; see %s\n' "$1" "$2" >&2
    if [ -r "$2" ]; then tail -n 15 "$2" | sed 's/^/    /' >&2; fi
  else
    printf '[testbed] ERROR: %s\n' "$1" >&2
  fi
  exit 1
}
need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }
check_int() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer (got '$2')"; }

# pid_of PIDFILE COMM: print the pid recorded in PIDFILE if that process is alive and is COMM
pid_of() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && running "$pid" || return 1
  echo "$pid"
}
watchdog_pid() {
  local pid
  pid=$(cat "$RUN/watchdog.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q -- ' _watchdog' || return 1
  echo "$pid"
}

# shellcheck source-path=SCRIPTDIR source=testbed_lib.sh
source "${SELF%/*}/testbed_lib.sh"  # closefds_exec, noinherit

# running PID: alive and not a zombie (daemons are reparented to PID 1, which may reap late)
running() { [[ $(cat "/proc/$1/stat" 2>/dev/null) =~ ^[0-9]+\ \(.*\)\ [^Z] ]]; }

# stop_pids SIG PID...: send SIG, wait up to 10 s, then SIGKILL what is left
stop_pids() {
  local sig=$1 p alive; shift
  [ $# -gt 0 ] || return 0
  kill "-$sig" "$@" 2>/dev/null || true
  for _ in $(seq 1 100); do
    alive=0
    for p in "$@"; do if running "$p"; then alive=1; fi; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  log "SIGKILL $*"
  kill -KILL "$@" 2>/dev/null || true
  sleep 0.5
}

# node_procs K: pids of all processes living in one of nodeK's UTS namespaces (slurmd,
# slurmstepd, job tasks), double-checked by that namespace's hostname
node_procs() {
  local uf=$RUN/node$1.uts pid
  [ -s "$uf" ] || return 0
  # one find over /proc instead of a readlink per process: "/proc/PID/ns uts:[INODE]"
  find /proc/[0-9]*/ns -maxdepth 1 -name uts -printf '%h %l\n' 2>/dev/null |
    grep -F -f "$uf" | sed -E 's#^/proc/([0-9]+)/ns .*#\1#' |
    while read -r pid; do
      # skip zombies: they cannot be killed and only wait for their parent
      running "$pid" || continue
      if [ "$(nsenter -t "$pid" -u hostname 2>/dev/null)" = "node$1" ]; then echo "$pid"; fi
    done
  return 0
}

# start_slurmd K: start nodeK's slurmd in a fresh UTS namespace with hostname nodeK.
# Serialised by a lock, since "up", "revive-node" and the watchdog may try at the same time.
start_slurmd() {
  ( flock -w 30 9 || exit 1; start_slurmd_locked "$1" ) 9>"$RUN/slurmd-node$1.lock"
}
start_slurmd_locked() {
  local k=$1 pf=$RUN/slurmd-node$1.pid lf=$LOG/slurmd-node$1.log pid
  if pid_of "$pf" slurmd >/dev/null; then return 0; fi
  rm -f "$pf"
  if ss -Htln "sport = :$((NODE_PORT_BASE + k))" 2>/dev/null | grep -q .; then
    echo "port $((NODE_PORT_BASE + k)) is already in use (a slurmd not started by us?)" >>"$lf"
    return 1
  fi
  mkdir -p "$DIR/state/d/node$k" "$DIR/tmp/node$k"
  chmod 1777 "$DIR/tmp/node$k"
  # slurmd forks into the background; its early errors go to its own log file
  # shellcheck disable=SC2016  # $0/$@ are meant for the inner sh, not for us
  noinherit unshare --uts -- /bin/sh -c 'hostname "$0" && exec "$@"' "node$k" \
    slurmd -f "$CONF" -N "node$k" </dev/null >>"$lf" 2>&1 || return 1
  for _ in $(seq 1 50); do pid_of "$pf" slurmd >/dev/null && break; sleep 0.1; done
  pid=$(pid_of "$pf" slurmd) || return 1
  readlink "/proc/$pid/ns/uts" >> "$RUN/node$k.uts"
  log "slurmd node$k started (pid $pid, 127.0.0.1:$((NODE_PORT_BASE + k)))"
}

# pmix_missing K: nodeK's running slurmd started before PMIx was installed (its log says "can
# not load PMIx library" since its last start) although the library is there now.  Such a slurmd
# offers pmix in `srun --mpi=list`, but a `srun --mpi=pmix` step hangs its nodes in COMPLETING.
pmix_missing() {
  [ -e "$PMIX_LIB" ] || return 1
  awk '/slurmd version .* started/ {bad = 0} /can not load PMIx library/ {bad = 1}
       END {exit !bad}' "$LOG/slurmd-node$1.log" 2>/dev/null
}
# restart_slurmd K: stop nodeK's slurmd and start it again, holding its start lock so that the
# watchdog cannot start one in between (running job steps survive: slurmstepd is separate)
restart_slurmd() {
  ( flock -w 30 9 || exit 1
    local p
    if p=$(pid_of "$RUN/slurmd-node$1.pid" slurmd); then stop_pids TERM "$p"; fi
    start_slurmd_locked "$1" ) 9>"$RUN/slurmd-node$1.lock"
}

# bad_nodes: comma list of nodes not idle/mix/alloc/completing (empty if none); fails if
# slurmctld does not answer
bad_nodes() {
  local states
  states=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null) || return 1
  [ -n "$states" ] || return 1
  awk '$2 !~ /^(idle|mix|alloc|comp)$/ {print $1}' <<<"$states" | sort -u | paste -sd, -
}
# wait_idle SECONDS [NODELIST]: wait until all (or the given) nodes are usable; resume nodes
# that stay DOWN/DRAIN (e.g. left over from an earlier run) every 5 s
wait_idle() {
  local secs=$1 only=${2:-} bad i
  for ((i = 1; i <= secs * 4; i++)); do
    if bad=$(bad_nodes); then
      if [ -n "$only" ]; then bad=$(tr ',' '\n' <<<"$bad" | grep -xF "$only" || true); fi
      [ -z "$bad" ] && return 0
      if [ $((i % 20)) = 0 ]; then
        scontrol update nodename="$bad" state=resume >/dev/null 2>&1 || true
      fi
    fi
    sleep 0.25
  done
  return 1
}

check_port_free() {
  if ss -Htln "sport = :$1" 2>/dev/null | grep -q .; then
    die "TCP port $1 is already in use (another SLURM running? e.g. the reference lab in /tmp/slurmlab); stop it first" \
      "$2"
  fi
}

write_if_changed() {  # write_if_changed FILE MODE < content; returns 0 if FILE changed
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  cat > "$tmp"
  chmod "$2" "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  mv -f "$tmp" "$1"
}

gen_conf() {
  local host k
  host=$(uname -n); host=${host%%.*}   # no "hostname -f"-style lookups
  cat <<EOF
# generated by scripts/slurm_testbed.sh -- do not edit, rerun "slurm_testbed.sh up"
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d/%n
TmpFS=$DIR/tmp/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no accounting (so no sacct: use scontrol show job within MinJobAge)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# start batch jobs at once (the default 3 s batch_sched_delay defers bursts of submits)
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# advertise the configured CPUs/memory, not the host's real ones
SlurmdParameters=config_overrides
MpiDefault=none
TaskProlog=$DIR/etc/task_prolog.sh
# a node that was DOWN (e.g. killed by a fault test) returns as soon as its slurmd registers
ReturnToService=2
# A killed slurmd is marked DOWN after ~20 s (measured: one failed ping costs MessageTimeout,
# DOWN needs two; with the defaults 10/300 it is minutes, with SlurmdTimeout=10-15 and
# MessageTimeout=10 about 30 s).  Loopback RPCs need far less than 5 s.  The watchdog
# restarts a crashed slurmd within ~1 s, well inside this.
SlurmdTimeout=10
MessageTimeout=5
SlurmctldTimeout=30
# jobs on a failed node end as NODE_FAIL instead of being requeued silently
JobRequeue=0
InactiveLimit=0
MinJobAge=30
KillWait=3
Waittime=0
MailProg=/bin/true
EOF
  for ((k = 1; k <= NNODES; k++)); do
    echo "NodeName=node$k NodeHostname=node$k NodeAddr=127.0.0.1 Port=$((NODE_PORT_BASE + k)) CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM State=UNKNOWN"
  done
  echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

# TaskProlog: runs before every task (batch scripts too); its "export K=V" lines land in the
# task's environment.  Keeps MPI on loopback; values set by the user win.
gen_task_prolog() {
  cat <<EOF
#!/bin/sh
# generated by scripts/slurm_testbed.sh
[ -n "\${UCX_NET_DEVICES:-}" ] || echo "export UCX_NET_DEVICES=lo"
[ -n "\${OMPI_MCA_btl_tcp_if_include:-}" ] || echo "export OMPI_MCA_btl_tcp_if_include=lo"
[ -n "\${OMPI_MCA_oob_tcp_if_include:-}" ] || echo "export OMPI_MCA_oob_tcp_if_include=lo"
# Open MPI between the test bed's nodes: UCX over TCP, as MPICH does. Open MPI's own TCP transport
# (ob1 + btl tcp) failed 2 of 15 3-node hellos under load here ("failed to TCP connect to a peer
# ... Operation now in progress", then a segfault); UCX failed none (docs/development.md)
if [ -z "\${OMPI_MCA_pml:-}" ]; then
  echo "export OMPI_MCA_pml=ucx"
  echo "export OMPI_MCA_pml_ucx_tls=any"
  echo "export OMPI_MCA_pml_ucx_devices=any"
fi
[ -n "\${SLURM_CONF:-}" ] || echo "export SLURM_CONF=$CONF"
exit 0
EOF
}

gen_env() {
  cat <<EOF
# source me: environment for the askap_flows SLURM test bed (scripts/slurm_testbed.sh)
export SLURM_CONF=$CONF
export ASKAP_TESTBED_DIR=$DIR
export ASKAP_TESTBED_NODES=$NNODES
export ASKAP_TESTBED_CPUS=$CPUS
export ASKAP_TESTBED_MEM=$MEM
export ASKAP_TESTBED_PARTITION=$PARTITION
export ASKAP_TESTBED_CLUSTER=$CLUSTER
# interface/address for the dask scheduler and workers (all loopback)
export ASKAP_TESTBED_IFACE=lo
export ASKAP_TESTBED_HOST_IP=127.0.0.1
# MPICH 4.0.2 (Debian) needs: srun --mpi=pmi2
export ASKAP_TESTBED_MPI=pmi2
# Open MPI 4.1.4 (Debian, external PMIx 4.2) needs: srun --mpi=pmix; its compiler wrapper:
export ASKAP_TESTBED_OMPI=pmix
export ASKAP_TESTBED_OMPI_MPICC=/usr/bin/mpicc.openmpi
EOF
}

# ------------------------------------------------------------------------------ watchdog
# save_cores K: a crashed slurmd drops "core" (~4 MB) in its working directory: keep the
# newest 5 as $LOG/crash/core.nodeK.TIME for debugging
save_cores() {
  local c
  for c in "$LOG/core" "$DIR/state/d/node$1/core"; do
    [ -f "$c" ] || continue
    mkdir -p "$LOG/crash" && mv -f "$c" "$LOG/crash/core.node$1.$(date +%Y%m%dT%H%M%S)" &&
      log "$(date +%T) watchdog: saved $LOG/crash/core.node$1.*"
  done
  # (no crash/ yet: find fails, and under pipefail + set -e that ended the watchdog itself)
  [ -d "$LOG/crash" ] || return 0
  find "$LOG/crash" -maxdepth 1 -name 'core.*' -printf '%T@ %p\n' 2>/dev/null |
    sort -rn | tail -n +6 | cut -d' ' -f2- | xargs -r rm -f
}

# Restarts any slurmd that died (Debian's slurmd 22.05.8 was seen to abort with "malloc():
# unaligned tcache chunk detected" under bursts of multi-node steps).  Does nothing while
# $PAUSE exists.  Exits when its pid file is removed or changed.
cmd_watchdog() {
  local k
  local -A last=()
  trap 'exit 0' TERM INT
  echo $$ > "$RUN/watchdog.pid"
  log "$(date +%T) watchdog started (pid $$, $NNODES nodes)"
  while [ "$(cat "$RUN/watchdog.pid" 2>/dev/null)" = "$$" ]; do
    if [ ! -e "$PAUSE" ]; then
      for ((k = 1; k <= NNODES; k++)); do
        pid_of "$RUN/slurmd-node$k.pid" slurmd >/dev/null && continue
        [ -e "$PAUSE" ] && break
        [ "$(cat "$RUN/watchdog.pid" 2>/dev/null)" = "$$" ] || break
        # at most one attempt per node every 5 s (a broken config must not spin)
        [ $((SECONDS - ${last[$k]:--10})) -ge 5 ] || continue
        last[$k]=$SECONDS
        log "$(date +%T) watchdog: slurmd node$k is gone, restarting it"
        save_cores "$k"
        start_slurmd "$k" || log "$(date +%T) watchdog: restart of node$k failed, see $LOG/slurmd-node$k.log"
      done
    fi
    sleep 1 & wait $! || true   # interruptible, so "down" does not wait for the sleep
  done
}

start_watchdog() {
  local pid
  if pid=$(watchdog_pid); then return 0; fi
  rm -f "$RUN/watchdog.pid"
  ASKAP_TESTBED_DIR=$DIR ASKAP_TESTBED_NODES=$NNODES \
    closefds_exec setsid bash "$SELF" _watchdog </dev/null >>"$LOG/watchdog.log" 2>&1 &
  for _ in $(seq 1 50); do pid=$(watchdog_pid) && break; sleep 0.1; done
  pid=$(watchdog_pid) || die "watchdog did not start" "$LOG/watchdog.log"
  log "watchdog started (pid $pid)"
}

stop_watchdog() {
  local pid
  pid=$(watchdog_pid) || { rm -f "$RUN/watchdog.pid"; return 0; }
  rm -f "$RUN/watchdog.pid"
  log "stopping watchdog (pid $pid)"
  stop_pids TERM "$pid"
}

# ------------------------------------------------------------------------------ up
install_packages() {
  local installed missing=() p
  installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${PKGS[@]}" 2>/dev/null |
    awk '$NF == "installed" {sub(/:.*/, "", $1); print $1}') || true
  for p in "${PKGS[@]}"; do grep -qxF "$p" <<<"$installed" || missing+=("$p"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "installing missing packages: ${missing[*]}"
  mkdir -p "$LOG"
  pin_mpich   # before: MPICH may be there already, and must not be switched by the install
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >"$LOG/apt.log" 2>&1 || die "package installation failed" "$LOG/apt.log"
}

# pin_mpich: keep MPICH as Debian's choice for mpicc/mpirun/libmpi.so.  Open MPI's alternatives
# have a higher priority (50 vs 40), so installing it would otherwise turn `mpicc` into Open MPI's
# under everything built with it (the check program, mpi4py).  Sets the groups to manual mode.
pin_mpich() {
  local group want cur
  for group in $(update-alternatives --get-selections | awk '$1 ~ /^mpi/ {print $1}'); do
    want=$(update-alternatives --list "$group" 2>/dev/null | grep -m1 mpich) || continue
    cur=$(update-alternatives --query "$group" 2>/dev/null | sed -n 's/^Value: //p')
    [ "$cur" = "$want" ] && update-alternatives --query "$group" | grep -qx 'Status: manual' && continue
    update-alternatives --set "$group" "$want" >/dev/null || die "update-alternatives --set $group $want failed"
    log "alternatives: $group -> $want (MPICH stays the default MPI)"
  done
}

start_munged() {
  local pid mlog=$DIR/munge/log/munged.log
  mkdir -p "$DIR"/munge/{etc,run,log,lib}
  if [ ! -s "$DIR/munge/etc/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/etc/munge.key" bs=1024 count=1 status=none
  fi
  if pid=$(pid_of "$DIR/munge/run/munged.pid" munged); then return 0; fi
  # munged insists on its own user and strict permissions
  chown -R munge:munge "$DIR/munge"
  chmod 700 "$DIR/munge/etc" "$DIR/munge/lib" "$DIR/munge/log"
  chmod 755 "$DIR/munge" "$DIR/munge/run"
  chmod 400 "$DIR/munge/etc/munge.key"
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock" "$DIR/munge/run/munged.pid"
  noinherit runuser -u munge -- munged --socket="$MUNGE_SOCK" \
    --key-file="$DIR/munge/etc/munge.key" --log-file="$mlog" \
    --pid-file="$DIR/munge/run/munged.pid" --seed-file="$DIR/munge/lib/munged.seed" \
    </dev/null >>"$LOG/munged.start.log" 2>&1 || die "munged failed to start" "$LOG/munged.start.log"
  for _ in $(seq 1 50); do pid=$(pid_of "$DIR/munge/run/munged.pid" munged) && break; sleep 0.1; done
  pid=$(pid_of "$DIR/munge/run/munged.pid" munged) || die "munged did not start" "$mlog"
  munge -S "$MUNGE_SOCK" -n 2>>"$mlog" | unmunge -S "$MUNGE_SOCK" >/dev/null 2>>"$mlog" ||
    die "munge credential round trip failed" "$mlog"
  log "munged started (pid $pid, socket $MUNGE_SOCK)"
}

start_slurmctld() {
  local pid
  if pid=$(pid_of "$RUN/slurmctld.pid" slurmctld); then return 0; fi
  check_port_free "$CTLD_PORT" "$LOG/slurmctld.log"
  noinherit slurmctld -f "$CONF" </dev/null >>"$LOG/slurmctld.log" 2>&1 ||
    die "slurmctld failed to start" "$LOG/slurmctld.log"
  for _ in $(seq 1 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
  scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer" "$LOG/slurmctld.log"
  pid=$(pid_of "$RUN/slurmctld.pid" slurmctld) || die "slurmctld died" "$LOG/slurmctld.log"
  log "slurmctld started (pid $pid, 127.0.0.1:$CTLD_PORT)"
}

cmd_up() {
  local t0=${EPOCHREALTIME/./} started=0 changed=0 k out n ms
  need_root
  check_int ASKAP_TESTBED_NODES "$NNODES"; check_int ASKAP_TESTBED_CPUS "$CPUS"
  check_int ASKAP_TESTBED_MEM "$MEM"
  [ "$NNODES" -le 50 ] || die "ASKAP_TESTBED_NODES must be <= 50"
  install_packages
  pin_mpich
  mkdir -p "$DIR/etc" "$RUN" "$LOG" "$DIR/state/ctld"
  chmod 755 "$DIR"

  # config: rewrite only on change; a change under running daemons needs a full restart
  if gen_conf | write_if_changed "$CONF" 644; then changed=1; fi
  gen_task_prolog | write_if_changed "$DIR/etc/task_prolog.sh" 755 || true
  if [ "$changed" = 1 ] && pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    log "slurm.conf changed under a running test bed: restarting it"
    cmd_down
    mkdir -p "$RUN" "$DIR/state/ctld"
  fi

  if ! pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    check_port_free "$CTLD_PORT" "$LOG/slurmctld.log"   # before starting anything
  fi
  if ! pid_of "$DIR/munge/run/munged.pid" munged >/dev/null; then start_munged; started=1; fi
  if ! pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then start_slurmctld; started=1; fi
  for ((k = 1; k <= NNODES; k++)); do
    if pid_of "$RUN/slurmd-node$k.pid" slurmd >/dev/null; then
      pmix_missing "$k" || continue
      log "slurmd node$k started before PMIx was installed: restarting it"
      restart_slurmd "$k" || die "slurmd node$k failed to restart" "$LOG/slurmd-node$k.log"
    else
      start_slurmd "$k" || die "slurmd node$k failed to start" "$LOG/slurmd-node$k.log"
    fi
    started=1
  done
  if [ "$started" = 1 ] && [ -e "$PAUSE" ]; then
    log "removing $PAUSE (left by kill-node): all nodes are up"; rm -f "$PAUSE"
  fi
  # (a restarted watchdog alone does not count as "started": no smoke test on a busy cluster)
  if ! watchdog_pid >/dev/null; then start_watchdog; fi

  gen_env | write_if_changed "$DIR/env.sh" 644 || true
  if [ ! -e "$ETC_LINK" ] && [ ! -L "$ETC_LINK" ]; then
    mkdir -p "${ETC_LINK%/*}" && ln -s "$CONF" "$ETC_LINK" && log "linked $ETC_LINK -> $CONF"
  elif [ "$(readlink "$ETC_LINK" 2>/dev/null || true)" != "$CONF" ]; then
    log "WARNING: $ETC_LINK exists and is not ours; left alone (always export SLURM_CONF)"
  fi

  wait_idle 60 || { sinfo -N >&2 || true; die "nodes not idle after 60 s" "$LOG/slurmctld.log"; }
  if [ "$started" = 1 ]; then
    # smoke test (skipped when everything was already up: the nodes may be busy with jobs)
    out=$(timeout 60 srun -N "$NNODES" -n "$NNODES" -p "$PARTITION" hostname 2>&1) ||
      die "smoke test 'srun -N$NNODES hostname' failed: $out" "$LOG/slurmctld.log"
    n=$(sort -u <<<"$out" | wc -l)
    [ "$n" = "$NNODES" ] || die "smoke test gave $n distinct hostnames, expected $NNODES: $out"
    log "srun -N$NNODES hostname -> $(sort <<<"$out" | paste -sd' ' -)"
    ms=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
    log "test bed up in $((ms / 1000)).$(printf %03d $((ms % 1000))) s: $NNODES nodes x $CPUS CPUs, partition $PARTITION"
  else
    log "test bed already up"
  fi
  log "use: source $DIR/env.sh"
}

# ------------------------------------------------------------------------------ down
cmd_down() {
  local jobs pids=() p k nodes
  need_root
  if [ ! -d "$DIR" ]; then log "nothing to stop ($DIR does not exist)"; return 0; fi
  stop_watchdog   # first, so that it does not restart what we stop
  # the opt-in second cluster uses this test bed's munged: it goes first
  if [ -d "${ASKAP_FAR_DIR:-/tmp/askap_testbed_far}/run" ]; then
    bash "${SELF%/*}/slurm_second_cluster.sh" down || true
  fi
  if pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | paste -sd' ' -) || true
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086  # word splitting of the job id list is intended
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  # every node we ever started: pid files and UTS namespace records
  nodes=$(find "$RUN" -maxdepth 1 \( -name 'slurmd-node*.pid' -o -name 'node*.uts' \) 2>/dev/null |
    sed -E 's#.*/(slurmd-)?node([0-9]+)\..*#\2#' | sort -un)
  for k in $nodes; do
    if p=$(pid_of "$RUN/slurmd-node$k.pid" slurmd); then pids+=("$p"); fi
  done
  if p=$(pid_of "$RUN/slurmctld.pid" slurmctld); then pids+=("$p"); fi
  if [ ${#pids[@]} -gt 0 ]; then log "stopping slurmd/slurmctld: ${pids[*]}"; stop_pids TERM "${pids[@]}"; fi
  for k in $nodes; do
    mapfile -t pids < <(node_procs "$k")
    if [ ${#pids[@]} -gt 0 ]; then
      log "stopping leftover processes on node$k: $(ps -o pid=,comm= -p "$(IFS=,; echo "${pids[*]}")" | paste -sd' ')"
      stop_pids TERM "${pids[@]}"
    fi
  done
  if p=$(pid_of "$DIR/munge/run/munged.pid" munged); then log "stopping munged: $p"; stop_pids TERM "$p"; fi
  rm -f "$DIR"/munge/run/munged.pid "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  if [ -L "$ETC_LINK" ] && [ "$(readlink "$ETC_LINK")" = "$CONF" ]; then
    rm -f "$ETC_LINK" && log "removed link $ETC_LINK"
  fi
  rm -rf "$RUN" "$DIR/state" "$DIR/tmp" "$DIR/env.sh"
  log "test bed down (logs kept in $LOG)"
}

# ------------------------------------------------------------------------------ status
# mpi_status: both MPI families, each with its compiler wrapper and the srun plugin it needs;
# fails when one is missing, mpicc is not MPICH's, or a slurmd runs without PMIx
mpi_status() {
  local ok=0 cc plugins k v
  plugins=$(srun --mpi=list 2>&1 | awk '/^[[:space:]]+[a-z_0-9]+$/ {print $1}' | paste -sd' ' -) || true
  cc=$(readlink -f "$(command -v mpicc)" 2>/dev/null) || cc=""
  v=$(dpkg-query -W -f='${Version}' mpich 2>/dev/null) || v=""
  if [ -n "$v" ] && [[ $cc == *mpich* ]]; then
    printf '  %-14s %s (mpicc -> %s), srun --mpi=pmi2%s\n' MPICH "$v" "$cc" \
      "$([[ " $plugins " == *" pmi2 "* ]] && echo "" || echo " NOT OFFERED")"
    [[ " $plugins " == *" pmi2 "* ]] || ok=1
  else
    printf '  %-14s NOT OK: mpicc is %s, not MPICH (slurm_testbed.sh up installs and pins it)\n' \
      MPICH "${cc:-missing}"; ok=1
  fi
  v=$(dpkg-query -W -f='${Version}' openmpi-bin 2>/dev/null) || v=""
  if [ -n "$v" ] && [ -x /usr/bin/mpicc.openmpi ] && [ -e "$PMIX_LIB" ]; then
    printf '  %-14s %s (/usr/bin/mpicc.openmpi, PMIx %s), srun --mpi=pmix%s\n' "Open MPI" "$v" \
      "$(dpkg-query -W -f='${Version}' libpmix2 2>/dev/null)" \
      "$([[ " $plugins " == *" pmix "* ]] && echo "" || echo " NOT OFFERED")"
    [[ " $plugins " == *" pmix "* ]] || ok=1
    for ((k = 1; k <= NNODES; k++)); do
      if pid_of "$RUN/slurmd-node$k.pid" slurmd >/dev/null && pmix_missing "$k"; then
        printf '  %-14s slurmd node%s started without PMIx: run slurm_testbed.sh up (restarts it)\n' "" "$k"
        ok=1
      fi
    done
  else
    printf '  %-14s NOT INSTALLED (openmpi-bin, libopenmpi-dev, libpmix-dev): run slurm_testbed.sh up\n' \
      "Open MPI"; ok=1
  fi
  return "$ok"
}

cmd_status() {
  local ok=0 p k bad
  show() {  # show NAME PID-or-empty
    if [ -n "$2" ]; then printf '  %-14s alive (pid %s)\n' "$1" "$2"; else printf '  %-14s DEAD\n' "$1"; ok=1; fi
  }
  echo "test bed $DIR:"
  p=$(pid_of "$DIR/munge/run/munged.pid" munged) || p=""; show munged "$p"
  p=$(pid_of "$RUN/slurmctld.pid" slurmctld) || p=""; show slurmctld "$p"
  for ((k = 1; k <= NNODES; k++)); do
    p=$(pid_of "$RUN/slurmd-node$k.pid" slurmd) || p=""; show "slurmd node$k" "$p"
  done
  p=$(watchdog_pid) || p=""; show watchdog "$p"
  if [ -e "$PAUSE" ]; then echo "  watchdog PAUSED ($PAUSE: $(paste -sd' ' "$PAUSE"))"; ok=1; fi
  if sinfo -N 2>/dev/null; then
    bad=$(bad_nodes) || bad="?"
    if [ -n "$bad" ]; then echo "  nodes not usable: $bad"; ok=1; fi
  else
    echo "  sinfo failed (slurmctld not answering)"; ok=1
  fi
  mpi_status || ok=1
  if [ "$ok" = 0 ]; then echo "status: OK"; else echo "status: NOT OK"; fi
  return "$ok"
}

# ------------------------------------------------------------------------------ fault tests
node_arg() {
  if [[ ! ${1:-} =~ ^[1-9][0-9]*$ ]] || [ "$1" -gt "$NNODES" ]; then
    die "need a node number 1..$NNODES (got '${1:-}')"
  fi
}

cmd_kill_node() {
  local k=${1:-} opt all=1 now=0 p pids=()
  need_root; node_arg "$k"; shift
  for opt in "$@"; do
    case "$opt" in
      --slurmd-only) all=0 ;;
      --down-now) now=1 ;;
      *) die "kill-node: unknown option '$opt' (--slurmd-only, --down-now)" ;;
    esac
  done
  [ -d "$RUN" ] || die "test bed is not up"
  # pause the watchdog BEFORE killing, so that it cannot restart the slurmd in between
  grep -qxF "node$k" "$PAUSE" 2>/dev/null || echo "node$k" >> "$PAUSE"
  if [ "$all" = 1 ]; then
    mapfile -t pids < <(node_procs "$k")
  elif p=$(pid_of "$RUN/slurmd-node$k.pid" slurmd); then
    pids=("$p")
  fi
  if [ ${#pids[@]} -gt 0 ]; then
    kill -KILL "${pids[@]}" 2>/dev/null || true
    log "node$k killed (SIGKILL ${pids[*]}); watchdog paused ($PAUSE)"
  else
    log "node$k: nothing running; watchdog paused ($PAUSE)"
  fi
  if [ "$now" = 1 ]; then
    scontrol update nodename="node$k" state=down reason="testbed kill-node" ||
      die "scontrol could not set node$k down" "$LOG/slurmctld.log"
    log "node$k set DOWN in slurmctld"
  else
    log "slurmctld will mark node$k DOWN in ~20 s (SlurmdTimeout + failed pings)"
  fi
}

cmd_revive_node() {
  local k=${1:-} rest
  need_root; node_arg "$k"
  [ -d "$RUN" ] || die "test bed is not up"
  # start first, unpause after: otherwise the watchdog may race us starting the same slurmd
  start_slurmd "$k" || die "slurmd node$k failed to start" "$LOG/slurmd-node$k.log"
  rest=$(grep -vxF "node$k" "$PAUSE" 2>/dev/null || true)
  if [ -n "$rest" ]; then echo "$rest" > "$PAUSE"; else rm -f "$PAUSE"; fi
  if ! wait_idle 3 "node$k"; then
    scontrol update nodename="node$k" state=resume >/dev/null 2>&1 || true
    wait_idle 50 "node$k" || { sinfo -N >&2 || true; die "node$k not idle after 60 s" "$LOG/slurmd-node$k.log"; }
  fi
  log "node$k is back: $(sinfo -h -n "node$k" -o '%t')"
  [ -e "$PAUSE" ] && log "watchdog still paused for: $(paste -sd' ' "$PAUSE")"
  return 0
}

cmd_stop_controller() {
  local pid
  need_root
  pid=$(pid_of "$RUN/slurmctld.pid" slurmctld) || { log "slurmctld is not running"; return 0; }
  kill -TERM "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  ! kill -0 "$pid" 2>/dev/null || die "slurmctld (pid $pid) did not stop" "$LOG/slurmctld.log"
  log "slurmctld stopped (was pid $pid)"
}

cmd_start_controller() {
  need_root
  [ -d "$RUN" ] || die "test bed is not up"
  start_slurmctld
}

usage() {
  sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

main() {
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    kill-node) cmd_kill_node "$@" ;;
    revive-node) cmd_revive_node "$@" ;;
    stop-controller) cmd_stop_controller ;;
    start-controller) cmd_start_controller ;;
    up-second-cluster) bash "${SELF%/*}/slurm_second_cluster.sh" up ;;
    down-second-cluster) bash "${SELF%/*}/slurm_second_cluster.sh" down ;;
    status-second-cluster) bash "${SELF%/*}/slurm_second_cluster.sh" status ;;
    _watchdog) cmd_watchdog ;;
    -h|--help|help) usage 0 ;;
    *) usage 2 >&2 ;;
  esac
}

# one line: bash has parsed it completely before running it, so editing this file while a
# watchdog runs from it cannot make bash read a half-written line afterwards
main "$@"; exit $?
