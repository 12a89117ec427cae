# The app: an HTTP service on container port 3000 that uses Postgres and Kafka from the
# datastorage job.
#
# Nomad has no dependencies between jobs, so the group starts with two prestart tasks that block
# until Postgres and Kafka really answer. The app's connection settings are rendered from Nomad
# service discovery; the Postgres password from the Nomad Variable nomad/jobs/app (key
# postgres_password), a copy of nomad/jobs/datastorage that `inv deploy.data` writes, because a
# task can only read the variables of its own job without an extra ACL policy.
#
# Host access: the app has a DYNAMIC host port (a static 3000 would leave no room for the canary
# next to the running allocation on a one-node cluster). Traefik (ingress job) answers on guest
# port 3000 and routes to the registered instances tagged traefik.enable=true: never a canary (see
# canary_tags below).

variable "image" {
  description = "App image. Built locally by `inv deploy.app --build` (tag = git commit), so it has no registry digest."
  type        = string
  default     = "infra-lab/app:dev"
}

variable "version" {
  description = "App version: exported as APP_VERSION and job meta, so a new version always rolls out a new deployment."
  type        = string
  default     = "dev"
}

variable "postgres_image" {
  description = "Used only by the prestart wait for pg_isready; the same pinned image as the datastorage job, so nothing extra is pulled."
  type        = string
  default     = "postgres:17.11-bookworm@sha256:051f7b7b3abdd564d5d1bd1e8c4b9c1b6e77087d1dd22020ede611c096a272e0"
}

variable "kafka_image" {
  description = "Used only by the prestart wait for kafka-broker-api-versions.sh; the same pinned image as the datastorage job."
  type        = string
  default     = "apache/kafka:4.3.1@sha256:77e3df9054047a88b520d0cc46e16696d3b22022e1d580aeccd2632df6532837"
}

variable "postgres_user" {
  description = "Postgres role; must match the datastorage job's postgres_user."
  type        = string
  default     = "app"
}

variable "postgres_db" {
  description = "Postgres database; must match the datastorage job's postgres_db."
  type        = string
  default     = "app"
}

variable "kafka_internal_port" {
  description = "Kafka's static listener port for other jobs; must match the datastorage job's kafka_internal_port."
  type        = number
  default     = 9092
}

variable "wait_timeout" {
  description = "Seconds a prestart wait gives its dependency before it fails with the last error (the restart policy then retries)."
  type        = number
  default     = 180
}

job "app" {
  type = "service"

  meta {
    version = var.version
  }

  # One canary next to the running version, promoted automatically once healthy, reverted
  # automatically when it is not. healthy_deadline covers the prestart waits (a full wait_timeout
  # for a dependency, one restart) and the app's own start.
  update {
    max_parallel      = 1
    canary            = 1
    auto_promote      = true
    auto_revert       = true
    health_check      = "checks"
    min_healthy_time  = "10s"
    healthy_deadline  = "8m"
    progress_deadline = "10m"
  }

  group "app" {
    count = 1

    network {
      # Dynamic host port, container port 3000: see the header.
      port "http" {
        to = 3000
      }
    }

    # Never fail the allocation over a restart: a datastorage redeploy leaves Postgres and Kafka
    # unregistered for ~20 s, and an app (or prestart wait) that exits in that window must be
    # restarted, not failed and rescheduled. "delay": after `attempts` restarts within `interval`,
    # wait for the interval to end and go on (client/allocrunner/taskrunner/restarts/restarts.go).
    # A broken version is still caught: its check never passes, so the canary is unhealthy at
    # healthy_deadline and auto_revert brings back the last good version.
    restart {
      attempts = 5
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    # On stop, Nomad deregisters the group's services first, then waits this long before killing
    # the tasks (client/allocrunner/group_service_hook.go, preKillLocked). Traefik polls Nomad every
    # 5 s (ingress job, refreshInterval): 10 s lets it drop the old instance while that instance
    # still answers, so a promotion costs no 502s. Nomad warns on every submit of a group with
    # services but no shutdown_delay (nomad/structs/structs.go).
    shutdown_delay = "10s"

    service {
      name     = "app"
      provider = "nomad"
      port     = "http"

      # Traefik's Nomad provider reads these tags (exposedByDefault=false: nothing without
      # traefik.enable=true is routed). Three routers, one service: entrypoint `app` (guest port
      # 3000) takes every request, entrypoints `web` (8080) and `websecure` (8443) route by host name.
      tags = [
        "traefik.enable=true",
        "traefik.http.routers.app.rule=PathPrefix(`/`)",
        "traefik.http.routers.app.entrypoints=app",
        "traefik.http.routers.app-web.rule=Host(`app.localhost`)",
        "traefik.http.routers.app-web.entrypoints=web",
        # HTTPS (entrypoint websecure, 8443): https://app.localhost:8443 with the project CA's certificate.
        "traefik.http.routers.app-secure.rule=Host(`app.localhost`)",
        "traefik.http.routers.app-secure.entrypoints=websecure",
        "traefik.http.routers.app-secure.tls=true",
        # The registration already carries the host port; stated so nobody "fixes" it to 3000,
        # the container port, which is not published on the node.
        "traefik.http.services.app.loadbalancer.server.port=${NOMAD_HOST_PORT_http}",
      ]

      # A canary registers with these tags instead (client/serviceregistration/nsd/nsd.go), and
      # with the normal tags once promoted (group_service_hook.go, Update). Without
      # traefik.enable=true Traefik never routes to it: group services are registered before any
      # task starts, prestart waits included, and Traefik's Nomad provider does not look at check
      # health (traefik pkg/provider/nomad/nomad.go, fetchService filters on the enable tag only).
      # A Traefik load-balancer health check would not help either: a new server counts as up
      # until its first check (pkg/server/service/loadbalancer/wrr/wrr.go, Add). Nomad uses
      # canary_tags only when the list is not empty, hence the marker tag.
      canary_tags = ["canary"]

      check {
        name     = "app-healthz"
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "3s"
      }
    }

    # Prestart: block until Postgres accepts connections. The address comes from service
    # discovery; before the service is registered `nomadService` renders an empty list (unlike
    # `nomadVar`, it does not block), so the template is guarded with `with` and the script
    # re-reads the file on every round instead of trusting it.
    task "wait-for-postgres" {
      driver = "docker"

      lifecycle {
        hook    = "prestart"
        sidecar = false
      }

      config {
        image   = var.postgres_image
        command = "/bin/sh"
        args    = ["/local/wait.sh"]
      }

      env {
        WAIT_TIMEOUT = var.wait_timeout
      }

      # Re-rendered when the registration changes; noop, because the loop reads it every round.
      template {
        destination = "local/deps.env"
        change_mode = "noop"
        data        = <<-EOT
        {{- with nomadService "postgres" }}{{ with index . 0 }}
        PGHOST={{ .Address }}
        PGPORT={{ .Port }}
        {{- end }}{{ end }}
        EOT
      }

      template {
        destination = "local/wait.sh"
        perms       = "0755"
        data        = <<-EOT
        #!/bin/sh
        # Wait until Postgres (found via Nomad service discovery) accepts connections.
        deadline=$(( $(date +%s) + WAIT_TIMEOUT ))
        last="service postgres is not registered in Nomad yet"
        while :; do
          PGHOST=""; PGPORT=""
          . /local/deps.env
          if [ -n "$PGHOST" ]; then
            if out=$(pg_isready -h "$PGHOST" -p "$PGPORT" -t 3 2>&1); then
              echo "postgres ready at $PGHOST:$PGPORT"
              exit 0
            fi
            last="pg_isready $PGHOST:$PGPORT: $out"
          fi
          if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "postgres not ready after $WAIT_TIMEOUT s: $last" >&2
            exit 1
          fi
          echo "waiting for postgres: $last"
          sleep 2
        done
        EOT
      }

      resources {
        cpu    = 50
        memory = 64
      }
    }

    # Prestart: block until the Kafka broker answers an ApiVersions request (a tcp connect alone
    # succeeds before KRaft has elected its controller).
    task "wait-for-kafka" {
      driver = "docker"

      lifecycle {
        hook    = "prestart"
        sidecar = false
      }

      config {
        image   = var.kafka_image
        command = "/bin/sh"
        args    = ["/local/wait.sh"]
      }

      env {
        WAIT_TIMEOUT = var.wait_timeout
        # The CLI tools default to a 256 MB heap; this one only sends a request.
        KAFKA_HEAP_OPTS = "-Xmx96m"
      }

      template {
        destination = "local/deps.env"
        change_mode = "noop"
        data        = <<-EOT
        {{- with nomadService "kafka" }}{{ with index . 0 }}
        KAFKA_ADDR={{ .Address }}:{{ .Port }}
        {{- end }}{{ end }}
        EOT
      }

      template {
        destination = "local/wait.sh"
        perms       = "0755"
        data        = <<-EOT
        #!/bin/sh
        # Wait until the Kafka broker (found via Nomad service discovery) answers ApiVersions.
        printf 'request.timeout.ms=5000\ndefault.api.timeout.ms=10000\n' > /local/client.properties
        deadline=$(( $(date +%s) + WAIT_TIMEOUT ))
        last="service kafka is not registered in Nomad yet"
        while :; do
          KAFKA_ADDR=""
          . /local/deps.env
          if [ -n "$KAFKA_ADDR" ]; then
            if out=$(/opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server "$KAFKA_ADDR" \
                --command-config /local/client.properties 2>&1); then
              echo "kafka ready at $KAFKA_ADDR"
              exit 0
            fi
            last="kafka-broker-api-versions $KAFKA_ADDR: $(echo "$out" | tail -n 3 | tr "\n" " ")"
          fi
          if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "kafka not ready after $WAIT_TIMEOUT s: $last" >&2
            exit 1
          fi
          echo "waiting for kafka: $last"
          sleep 2
        done
        EOT
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }

    task "app" {
      driver = "docker"

      config {
        image = var.image
        ports = ["http"]
        # The image is built and loaded into the node's Docker by deploy.app; never pull it.
        force_pull = false
      }

      env {
        PORT        = "3000"
        APP_VERSION = var.version
      }

      # Connection settings from service discovery, rendered before the app starts (the prestart
      # tasks have seen both services by then). Restart on change: the app reads its env once.
      #
      # `nomadVar` BLOCKS until nomad/jobs/app exists (consul-template template/nomad_funcs.go:
      # EnableBlocking): the task does not start before `inv deploy.data` wrote it, and the task's
      # events say "Missing: nomad.var.block(nomad/jobs/app@...)". It never renders empty.
      # `nomadService` does render an empty list for a service that is not registered, so those
      # lookups are guarded: a missing service yields missing variables, never half an address.
      #
      # wait: after the first render, a change is rendered only once the data has been stable for
      # `min` (at the latest `max` after the first change; consul-template manager/runner.go,
      # quiescence). A datastorage redeploy deregisters Postgres and Kafka for ~20 s: when they come
      # back on the same address the rendered file is unchanged and the app is NOT restarted (it
      # answers /healthz with 503 naming what is down and recovers on its own).
      #
      # KAFKA_BOOTSTRAP_SERVERS is never rendered empty: while the kafka service is not registered
      # (Kafka restarting for longer than wait.min) the `else` renders the node's address and Kafka's
      # static port, the very address the service registers (datastorage job), so the file does not
      # change either way and the app keeps running. `env "attr..."` reads node attributes: Nomad gives
      # consul-template the task env plus the node's attributes (client/allocrunner/taskrunner/
      # template/template.go templateRunner: runner.Env = EnvBuilder.Build().All(); client/taskenv/
      # env.go TaskEnv.All). Without it the app started without the variable and exited 2 until Kafka
      # came back (it now also starts when Kafka does not answer, reporting kafka down on /healthz).
      template {
        destination = "secrets/app.env"
        env         = true
        change_mode = "restart"

        wait {
          min = "30s"
          max = "90s"
        }

        data = <<-EOT
        PGUSER=${var.postgres_user}
        PGDATABASE=${var.postgres_db}
        {{- with nomadVar "nomad/jobs/app" }}{{ $password := .postgres_password }}
        PGPASSWORD={{ $password }}
        {{- with nomadService "postgres" }}{{ with index . 0 }}
        PGHOST={{ .Address }}
        PGPORT={{ .Port }}
        DATABASE_URL=postgresql://${var.postgres_user}:{{ $password | urlquery }}@{{ .Address }}:{{ .Port }}/${var.postgres_db}
        {{- end }}{{ end }}
        {{- end }}
        KAFKA_BOOTSTRAP_SERVERS={{ with nomadService "kafka" }}{{ range $i, $s := . }}{{ if $i }},{{ end }}{{ $s.Address }}:{{ $s.Port }}{{ end }}{{ else }}{{ env "attr.unique.network.ip-address" }}:${var.kafka_internal_port}{{ end }}
        EOT
      }

      resources {
        cpu    = 300
        memory = 256
      }
    }
  }
}
