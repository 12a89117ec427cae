#!/bin/sh
# Enable Docker and wait (bounded) until the daemon answers, so Nomad fingerprints a healthy driver.
set -eu
. /etc/infra-lab/provision.env
# The login user may use docker without sudo (the group exists once docker.io is installed).
usermod -aG docker "$LOGIN_USER"
systemctl enable --now docker.service
i=0
until docker info >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -ge 120 ]; then
        echo "infra-lab: docker did not answer within 120 s" >&2
        journalctl -u docker.service --no-pager -n 30 >&2 || true
        exit 1
    fi
    sleep 1
done
echo "infra-lab: docker ready: $(docker version --format '{{.Server.Version}}')"
