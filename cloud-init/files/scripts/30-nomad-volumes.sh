#!/bin/sh
# Create the directories behind Nomad's host volumes (listed in /etc/infra-lab/host-volumes) with the
# owners the container images expect. Existing data is never touched: only missing directories are made.
set -eu
grep -v '^#' /etc/infra-lab/host-volumes | while read -r path uid gid mode; do
    [ -n "$path" ] || continue
    if [ ! -d "$path" ]; then
        install -d -o "$uid" -g "$gid" -m "$mode" "$path"
        echo "infra-lab: created host volume directory $path"
    fi
done
