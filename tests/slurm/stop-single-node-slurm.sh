#!/bin/bash
# Stop the cluster tests/slurm/start-single-node-slurm.sh started: cancel its
# jobs, then end slurmd, slurmctld and munged by the PIDs in their pid files
# (never by process name, which could hit someone else's daemon).
set -uo pipefail
export PATH="/usr/sbin:$PATH"

[ "$(id -u)" = 0 ] || { echo "stop-single-node-slurm: run as root" >&2; exit 1; }

if [ -s /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
  squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
fi

stop() {  # name pidfile
  local pid
  [ -s "$2" ] || { echo "$1: no pid file"; return 0; }
  pid=$(cat "$2")
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "$1: not running"; rm -f "$2"; return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$1 ($pid) ignored SIGTERM for 10 s; SIGKILL"; kill -KILL "$pid"
  fi
  rm -f "$2"
  echo "$1 ($pid) stopped"
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop munged /run/munge/munged.pid
