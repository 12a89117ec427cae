#!/bin/sh
# Enable Docker and wait (bounded) until the daemon answers, so Nomad fingerprints a healthy driver.
set -eu
. /etc/infra-lab/provision.env
. /usr/local/lib/infra-lab/lib.sh
# The login user may use docker without sudo (the group exists once docker.io is installed).
usermod -aG docker "$LOGIN_USER"
systemctl enable --now docker.service
wait_for docker docker.service 120 docker info
echo "infra-lab: docker ready: $(docker version --format '{{.Server.Version}}')"
