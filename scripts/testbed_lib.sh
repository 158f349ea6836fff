# shellcheck shell=bash
# testbed_lib.sh -- helpers that slurm_testbed.sh and slurm_second_cluster.sh both source (from
# their own directory, so that they also work from an installed wheel's askap_flows/scripts/).

# noinherit CMD...: run CMD with every inherited file descriptor above 2 closed.  A daemon
# that keeps a caller's pipe open makes e.g. a CI runner wait forever for EOF.
# (Use closefds_exec directly in a background "&" job: noinherit there would leave the
# forked job shell, holding the caller's fds, waiting for the subshell.)
closefds_exec() {
  local fdpath fd
  for fdpath in /proc/"$BASHPID"/fd/*; do
    fd=${fdpath##*/}
    if [[ $fd =~ ^[0-9]+$ ]] && [ "$fd" -gt 2 ]; then exec {fd}>&- || true; fi
  done
  exec "$@"
}
noinherit() { ( closefds_exec "$@" ); }
