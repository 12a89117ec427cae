# Project settings for the single-node Nomad agent, merged over the package's /etc/nomad.d/nomad.hcl.
# Written by cloud-init (write_files, defer: true) as /etc/nomad.d/zz-infra-lab.hcl.
#
# The name matters: `nomad agent -config /etc/nomad.d` (the packaged unit) loads every *.hcl in the
# directory sorted by name, byte-wise, and merges each file over the ones before it, so the LAST file
# wins on a key both set (hashicorp/nomad command/agent/config.go, LoadConfigDir: sort.Strings, then
# result.Merge(config)). "zz-" sorts after "nomad.hcl"; "10-" or "99-" would sort BEFORE it (digits
# come before letters) and the package's file would win. `python -m infra.nomad.speclint` checks the order.

# Inside the VM Nomad must listen on the guest's DHCP address: qemu's user-mode forwards target
# 10.0.2.15, not the guest's 127.0.0.1. The host side of every forward is bound to 127.0.0.1 only.
bind_addr = "0.0.0.0"
data_dir  = "/opt/nomad/data"

server {
  enabled          = true
  bootstrap_expect = 1
}

client {
  enabled = true

  # This node holds the stateful jobs' host volumes: nomad/datastorage.nomad.hcl is constrained to it, so
  # Postgres and Kafka never start on an empty disk elsewhere. In a local cluster (vm.nodes >= 3) each
  # node's /etc/nomad.d/zzz-cluster.json overrides it: "true" on nomad-1 only (infra/guest/seed.py).
  # It is also the entry point: the host's forwards of Traefik's entrypoints arrive here, so
  # nomad/ingress.nomad.hcl is constrained to infra_lab_entry.
  meta {
    infra_lab_data  = "true"
    infra_lab_entry = "true"
  }

  # No cni_path: no job uses bridge networking (Docker's own port mapping needs no CNI), and nothing
  # installs CNI plugins in the guest. A job with network { mode = "bridge" } would need the
  # containernetworking-plugins package and cni_path = "/usr/lib/cni"; speclint refuses bridge mode.

  # Persistent data for the datastorage job. The directories must exist before the client starts
  # ("failed to validate volume" otherwise); cloud-init creates them with the owners the images expect.
  # Purging a job leaves them untouched: that is the point. Jobs mount them with a group `volume`
  # (type = "host") and a task `volume_mount`, which the docker driver binds whatever the plugin's
  # `volumes` setting (drivers/docker/driver.go: task.Mounts become hostConfig.Mounts).
  host_volume "postgres-data" {
    path      = "/opt/nomad/volumes/postgres"
    read_only = false
  }

  host_volume "kafka-data" {
    path      = "/opt/nomad/volumes/kafka"
    read_only = false
  }

  # Traefik's acme.json: the ACME account and certificates survive a restart or a redeploy of the
  # ingress job, so Let's Encrypt is not asked again (its rate limits).
  host_volume "traefik-acme" {
    path      = "/opt/nomad/volumes/traefik-acme"
    read_only = false
  }
}

plugin "docker" {
  config {
    # No `volumes { enabled = true }`: the alloc, local and secrets directories (where templates
    # render) are always bound, and host volumes are Nomad volumes (above). Enabling it would only
    # let a job's config.volumes / mount bind any host path, `/` included, on this ACL-less cluster
    # (drivers/docker/driver.go, containerBinds: the check runs only when volumes are disabled).
    allow_privileged = false

    # A pull that shows no progress for pull_activity_timeout (default "2m") is cancelled, whatever the
    # job's image_pull_timeout (drivers/docker/config.go configSpec; coordinator.go pullImageImpl gets
    # both): under TCG, extracting one large layer (Kafka's JRE) can be quiet for longer than that.
    # 10m, the longest image_pull_timeout of the job specs (speclint: docker-pull-activity).
    pull_activity_timeout = "10m"

    # The docker driver garbage-collects an image `image_delay` (default 3m) after the last task
    # using it stops, locally built images included: existing images are reference-counted too
    # (drivers/docker/config.go gc defaults; driver.go createImage -> IncrementImageReference).
    # The app image is built on this node and exists in no registry, so a deleted image could not be
    # pulled back: `inv up` / `inv deploy.app` without --build would fail. Never remove images; the
    # cost is disk (old app tags stay until `docker image prune -a` in `inv vm.ssh`), which a short-lived
    # lab VM can afford, where a long image_delay would only postpone the same failure.
    gc {
      image = false
    }
  }
}

telemetry {
  publish_allocation_metrics = true
  publish_node_metrics       = true
}
