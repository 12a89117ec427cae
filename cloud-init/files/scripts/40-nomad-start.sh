#!/bin/sh
# Start Nomad (ordered after Docker by the systemd drop-in) and wait, bounded, until its API answers.
set -eu
systemctl daemon-reload
systemctl enable --now nomad.service
i=0
until curl -fsS http://127.0.0.1:4646/v1/agent/health >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -ge 120 ]; then
        echo "infra-lab: nomad API did not answer within 120 s" >&2
        journalctl -u nomad.service --no-pager -n 40 >&2 || true
        exit 1
    fi
    sleep 1
done
echo "infra-lab: nomad agent healthy"
