#!/bin/sh
# Start Nomad (ordered after Docker by the systemd drop-in) and wait, bounded, until its API answers.
set -eu
. /usr/local/lib/infra-lab/lib.sh
systemctl daemon-reload
systemctl enable --now nomad.service
wait_for "the nomad API" nomad.service 120 curl -fsS http://127.0.0.1:4646/v1/agent/health
echo "infra-lab: nomad agent healthy"
