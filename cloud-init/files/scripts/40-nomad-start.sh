#!/bin/sh
# Start Nomad (ordered after Docker by the systemd drop-in) and wait, bounded, until its API answers.
set -eu
. /usr/local/lib/infra-lab/lib.sh
. /etc/infra-lab/provision.env
if [ "${NOMAD_SERVER:-true}" = false ]; then
    # A client-only node of a local cluster (node 4 and on): the package's nomad.hcl and ours enable a
    # server, and a later file cannot switch it off (command/agent/config.go, ServerConfig.Merge: `enabled`
    # only ever turns on). Drop the package's file and our server block; zzz-cluster.json names the servers.
    rm -f /etc/nomad.d/nomad.hcl
    sed -i '/^server {/,/^}/d' /etc/nomad.d/zz-infra-lab.hcl
fi
systemctl daemon-reload
systemctl enable --now nomad.service
wait_for "the nomad API" nomad.service 120 curl -fsS http://127.0.0.1:4646/v1/agent/health
echo "infra-lab: nomad agent healthy"
