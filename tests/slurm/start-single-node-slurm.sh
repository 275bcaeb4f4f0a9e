#!/bin/bash
# Start a throwaway single-node SLURM cluster on this machine, to test
# workflow/profiles/slurm for real (tests/test_slurm_profile.py, docs/slurm.md).
#
#   apt-get install -y slurm-wlm munge      # Debian/Ubuntu; once
#   sudo tests/slurm/start-single-node-slurm.sh
#   ...                                      # sbatch, snakemake, pytest
#   sudo tests/slurm/stop-single-node-slurm.sh
#
# Runs munged, slurmctld and slurmd directly (no systemd), one partition
# holding this host, and a fake GPU (gres.conf File=/dev/null) so that the
# workflow's `resources: gpu=1` rules (sbatch --gpus=1) can be scheduled here.
# No slurmdbd: `sacct` does not work, which is why tests/slurm/profile polls
# job status with squeue.
#
# It overwrites /etc/slurm/slurm.conf and gres.conf, so it refuses to run where
# a slurm.conf it did not write exists (FORCE=1 overrides). Safe to run twice:
# a cluster it already started is left as it is.
#
# Environment: PARTITION (default "debug"), DEF_MEM_PER_CPU in MB (default 500),
# FAKE_GPUS (default 1).
set -euo pipefail

PARTITION=${PARTITION:-debug}
DEF_MEM_PER_CPU=${DEF_MEM_PER_CPU:-500}
FAKE_GPUS=${FAKE_GPUS:-1}
CONF=/etc/slurm/slurm.conf
MARK="# written by medrobust tests/slurm/start-single-node-slurm.sh"

die() { echo "start-single-node-slurm: $*" >&2; exit 1; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || die "run as root (it starts daemons and writes /etc/slurm)"
for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] \
    || die "$tool not found: apt-get install -y slurm-wlm munge"
done
export PATH="/usr/sbin:$PATH"

if running /run/slurmctld.pid && running /run/slurmd.pid; then
  echo "SLURM already running (slurmctld $(cat /run/slurmctld.pid), slurmd $(cat /run/slurmd.pid))"
  sinfo
  exit 0
fi
if [ -e "$CONF" ] && ! grep -qxF "$MARK" "$CONF" && [ "${FORCE:-0}" != 1 ]; then
  die "$CONF exists and was not written by this script; FORCE=1 to overwrite it"
fi

host=$(hostname -s)
# "NodeName=host CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=.."
node=$(slurmd -C | grep '^NodeName=')
[ -n "$node" ] || die "slurmd -C did not describe this node"

mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm

cat > "$CONF" <<CONFEOF
$MARK
ClusterName=medrobust-test
SlurmctldHost=$host
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
# containers and CI machines rarely give cgroup control: track by process
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
# finished jobs stay visible to squeue this long (s): the profile polls with
# squeue, and needs >= 3x slurm-init-seconds-before-status-checks
MinJobAge=300
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job that names no memory is given the whole node
DefMemPerCPU=$DEF_MEM_PER_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
$node Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONFEOF
# A fake GPU: slurm 22.05 ignores a gres without File=, and /dev/null is
# harmless; SLURM still sets CUDA_VISIBLE_DEVICES in jobs that ask for it.
{
  echo "$MARK"
  echo "NodeName=$host Name=gpu File=/dev/null Count=$FAKE_GPUS"
} > /etc/slurm/gres.conf

# munge: the key comes with the Debian package; make one where it is missing
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
if ! running /run/munge/munged.pid; then
  runuser -u munge -- munged
fi
munge -n | unmunge >/dev/null || die "munge does not round-trip a credential"

# -c: start from an empty job state (a test cluster keeps nothing between runs)
running /run/slurmctld.pid || slurmctld -c
running /run/slurmd.pid || slurmd

for _ in $(seq 120); do
  state=$(sinfo -h -p "$PARTITION" -o %T 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.5
done
[ "${state:-}" = idle ] || die "node not idle after 60 s (state '${state:-none}'); see /var/log/slurm/"
sinfo -V
sinfo -N -o "%N %P %T %c %m %G"
