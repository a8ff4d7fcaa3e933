#!/usr/bin/env bash
# Cluster suites (tests/clusters): a real 3-node MariaDB Galera cluster and a
# PostgreSQL primary + hot standby, each built once per test module on free
# loopback ports in directories of its own, and removed afterwards. The
# machine's own database servers are not touched. About a minute on 2 cores.
set -euo pipefail

missing=()
[ -f /usr/lib/galera/libgalera_smm.so ] || missing+=(galera-4)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# -s: the suites print their figures (retries, time to recover, effects counted).
SESSIONSCOPE_CLUSTERS=1 .venv/bin/pytest -q -s -p no:cacheprovider tests/clusters
