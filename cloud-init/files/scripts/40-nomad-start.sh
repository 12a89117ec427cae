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
if [ -n "${NOMAD_SERVER:-}" ] && [ ! -e /etc/infra-lab/cluster-joined ]; then
    # A cluster node's first start: a guest booted from a bake has Nomad enabled, so it may have started
    # before cloud-init wrote zzz-cluster.json and bootstrapped a one-server Raft of its own. Stop it and
    # clear that state once (nothing runs on it yet), so it joins the cluster with the cluster's settings.
    if systemctl is-active --quiet nomad.service; then systemctl stop nomad.service; fi
    if [ -d /opt/nomad/data ]; then find /opt/nomad/data -mindepth 1 -delete; fi
    touch /etc/infra-lab/cluster-joined
fi
systemctl daemon-reload
systemctl enable --now nomad.service
# A cluster node waits longer: its agent reports healthy once the servers have found each other.
limit=120
if [ -n "${NOMAD_SERVER:-}" ]; then limit=600; fi
wait_for "the nomad API" nomad.service "$limit" curl -fsS http://127.0.0.1:4646/v1/agent/health
echo "infra-lab: nomad agent healthy"
