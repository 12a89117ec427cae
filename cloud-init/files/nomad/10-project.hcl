# Project settings for the single-node Nomad agent, merged over the package's /etc/nomad.d/nomad.hcl.
# Written by cloud-init (write_files, defer: true) after the nomad package is installed.

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

  # Debian and Ubuntu install the CNI plugins here, not in Nomad's default /opt/cni/bin.
  cni_path = "/usr/lib/cni"

  # Persistent data for the datastorage job. The directories must exist before the client starts
  # ("failed to validate volume" otherwise); cloud-init creates them with the owners the images expect.
  # Purging a job leaves them untouched: that is the point.
  host_volume "postgres-data" {
    path      = "/opt/nomad/volumes/postgres"
    read_only = false
  }

  host_volume "kafka-data" {
    path      = "/opt/nomad/volumes/kafka"
    read_only = false
  }
}

plugin "docker" {
  config {
    # Jobs bind-mount files they render; host volumes above do not need this, templates do.
    volumes {
      enabled = true
    }
    allow_privileged = false
  }
}

telemetry {
  publish_allocation_metrics = true
  publish_node_metrics       = true
}
