#!/usr/bin/env bash
# Debian packages the integration tests need: a real Slurm cluster for tests/test_slurm.py
# (tests/slurm_cluster.py starts its own munged, slurmctld and two slurmd from a temporary
# folder; Debian 12 ships Slurm 22.05). Installed only when missing; needs root (CI and
# these machines run as root).
set -euo pipefail
# Root's PATH has /usr/sbin; look there as well so that a narrow PATH does not reinstall.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
need=()
have slurmctld || need+=(slurmctld)
have slurmd || need+=(slurmd)
have sbatch || need+=(slurm-client)
have munged || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "[vlbert] missing Debian packages for the Slurm tests: ${need[*]} (run as root or install them)" >&2
    exit 0
  fi
  echo "[vlbert] installing Debian packages: ${need[*]}"
  # Keep the packages' own services (system munged, slurmctld, slurmd with /etc/slurm) from
  # starting: the tests run their own daemons, and these would only fail for want of a config.
  policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_added=1
  fi
  trap '[ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq
  # Without recommends: the basic plugins hold everything the test cluster uses, and the
  # recommended ones pull in MySQL, HDF5, InfluxDB and IPMI libraries.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
