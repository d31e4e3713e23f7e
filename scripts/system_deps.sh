#!/usr/bin/env bash
# Debian packages the integration tests need (a real Slurm cluster for tests/test_slurm.py).
# Installed only when missing; needs root (CI and these machines run as root).
set -euo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "[vlbert] missing Debian packages for the Slurm tests: ${need[*]} (run as root or install them)" >&2
    exit 0
  fi
  echo "[vlbert] installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
