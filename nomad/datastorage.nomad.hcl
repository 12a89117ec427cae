# Kafka (single-node KRaft) and Postgres on Nomad host volumes.
#
# Data lives in the host volumes `postgres-data` and `kafka-data`, declared in the agent config
# (cloud-init/files/nomad/zz-infra-lab.hcl). Stopping or purging this job leaves them alone; a new
# allocation on the same node mounts the same directories again.
#
# The Postgres password is read from the Nomad Variable nomad/jobs/datastorage (key
# postgres_password). `inv deploy.data` creates it when it is missing, plus the copy the app job
# reads (nomad/jobs/app, same key); it is never in this repo.

variable "postgres_image" {
  description = "Official Postgres image, pinned by tag and index digest. The major version decides where PGDATA lives (see the postgres task)."
  type        = string
  default     = "postgres:17.11-bookworm@sha256:051f7b7b3abdd564d5d1bd1e8c4b9c1b6e77087d1dd22020ede611c096a272e0"
}

variable "kafka_image" {
  description = "Official apache/kafka image (KRaft only since 4.0), pinned by tag and index digest."
  type        = string
  default     = "apache/kafka:4.3.1@sha256:77e3df9054047a88b520d0cc46e16696d3b22022e1d580aeccd2632df6532837"
}

variable "postgres_user" {
  description = "Role created on first start of an empty data directory. The app job must use the same value."
  type        = string
  default     = "app"
}

variable "postgres_db" {
  description = "Database created on first start of an empty data directory. The app job must use the same value."
  type        = string
  default     = "app"
}

variable "kafka_cluster_id" {
  description = "KRaft cluster id the storage is formatted with. Changing it makes the persisted log dirs unusable."
  type        = string
  default     = "d9isiBgBTBmd7WQ479iMDg"
}

variable "kafka_internal_port" {
  description = "Kafka's listener for other jobs, a static port on the node (the app's template falls back to it); must match the app job's kafka_internal_port."
  type        = number
  default     = 9092
}

variable "kafka_host_port" {
  description = "Kafka listener for clients on the host, advertised as localhost:<port>. Host forward, guest port and container port must all be this number."
  type        = number
  default     = 19092
}

job "datastorage" {
  type = "service"

  # Stateful groups: one allocation each, replaced in place (no canary: it would mount the same
  # host volume next to the running instance, two writers on one data dir, and collide on static
  # ports). The first deploy pulls both images, which under TCG emulation alone can take minutes:
  # the deadlines (and image_pull_timeout below) are generous but stay under deploy.timeout
  # (15 min, invoke.yaml).
  update {
    max_parallel      = 1
    health_check      = "checks"
    min_healthy_time  = "10s"
    healthy_deadline  = "12m"
    progress_deadline = "14m"
    auto_revert       = true
  }

  group "postgres" {
    count = 1

    # Docker's own port mapping (no CNI bridge needed). Static, because the VM forwards
    # 127.0.0.1:15432 on the host to guest port 5432.
    network {
      port "db" {
        static = 5432
        to     = 5432
      }
    }

    volume "data" {
      type      = "host"
      source    = "postgres-data"
      read_only = false
    }

    # A database should come back on its own: keep restarting with a delay instead of failing the
    # allocation (a failed allocation would be rescheduled without its data on a multi-node cluster).
    restart {
      attempts = 3
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    # On stop, the service is deregistered first and the task killed this much later
    # (client/allocrunner/group_service_hook.go), so consumers see it gone before connections drop.
    # Nomad warns on every submit of a group with services and no shutdown_delay
    # (nomad/structs/structs.go). Short: it adds to the gap a redeploy leaves.
    shutdown_delay = "5s"

    # Native Nomad checks only know http and tcp (pg_isready needs Consul script checks), so this
    # proves the port accepts connections; consumers run pg_isready in their prestart task.
    service {
      name     = "postgres"
      provider = "nomad"
      port     = "db"

      check {
        name     = "postgres-tcp"
        type     = "tcp"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "postgres" {
      driver = "docker"

      # SIGINT is Postgres' fast shutdown (the image's STOPSIGNAL): roll back, checkpoint, exit.
      kill_signal  = "SIGINT"
      kill_timeout = "30s"

      config {
        image              = var.postgres_image
        ports              = ["db"]
        image_pull_timeout = "10m"
      }

      # Postgres 17 keeps PGDATA at /var/lib/postgresql/data. Postgres 18+ moved it to
      # /var/lib/postgresql/<major>/docker and refuses to start on data found at the old path: when
      # moving to 18, mount the volume at /var/lib/postgresql and migrate with pg_upgrade.
      volume_mount {
        volume      = "data"
        destination = "/var/lib/postgresql/data"
        read_only   = false
      }

      env {
        PGDATA        = "/var/lib/postgresql/data"
        POSTGRES_USER = var.postgres_user
        POSTGRES_DB   = var.postgres_db
      }

      # The password only seeds an EMPTY data directory (initdb); later changes of the variable do
      # not change the role's password, so restarting on change would only cause downtime.
      # `nomadVar` blocks until the variable exists (consul-template template/nomad_funcs.go,
      # EnableBlocking): without it the task waits, its events saying "Missing: nomad.var.block(...)";
      # it never starts with an empty POSTGRES_PASSWORD. `inv deploy.data` writes it before submitting.
      template {
        destination = "secrets/postgres.env"
        env         = true
        change_mode = "noop"
        data        = <<-EOT
        {{- with nomadVar "nomad/jobs/datastorage" }}
        POSTGRES_PASSWORD={{ .postgres_password }}
        {{- end }}
        EOT
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  group "kafka" {
    count = 1

    network {
      # Listener for other jobs, advertised as <node address>:<port> and found by consumers through
      # the `kafka` service. A STATIC port (one known node): with a dynamic one every replacement of
      # Kafka moved it, so the app's rendered KAFKA_BOOTSTRAP_SERVERS changed and the app restarted
      # (and, Kafka away longer than the template's wait.min, restarted without it). Static, a new
      # Kafka registers the same address, the app's template renders the same bytes and Nomad does not
      # restart it (consul-template renderer.go FileRenderer.Render: DidRender false for equal
      # contents; Nomad's template.go handleTemplateRerenders acts only on a new LastDidRender).
      port "kafka" {
        static = var.kafka_internal_port
        to     = var.kafka_internal_port
      }

      # Listener for clients on the host: the VM forwards 127.0.0.1:19092 to guest port 19092.
      # Kafka clients reconnect to the ADVERTISED address, so host, guest and container port must
      # be the same number.
      port "kafka_host" {
        static = var.kafka_host_port
        to     = var.kafka_host_port
      }
    }

    volume "data" {
      type      = "host"
      source    = "kafka-data"
      read_only = false
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    # See the postgres group.
    shutdown_delay = "5s"

    # The runtime image has no curl/wget/nc, and native checks cannot run scripts: a tcp check on
    # the listener other jobs use. Consumers prove readiness with kafka-broker-api-versions.sh.
    service {
      name     = "kafka"
      provider = "nomad"
      port     = "kafka"

      check {
        name     = "kafka-tcp"
        type     = "tcp"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "kafka" {
      driver = "docker"

      # Room for a controlled shutdown, so the next start does not have to recover the log.
      kill_timeout = "30s"

      # The image's user, by number: apache/kafka's docker/jvm/Dockerfile creates it with
      # `adduser -h /home/appuser -D --shell /bin/bash appuser` (no -u) on eclipse-temurin:21-jre-alpine,
      # so busybox gives it the first free uid from 1000, and ends with `USER appuser`. Saying the uid
      # here makes the process and the host volume's owner (cloud-init/files/nomad/host-volumes:
      # 1000 1000) agree by construction rather than by that assumption.
      user = "1000:1000"

      config {
        image              = var.kafka_image
        ports              = ["kafka", "kafka_host"]
        image_pull_timeout = "10m"
      }

      # The task runs as uid 1000 (`user` above); cloud-init creates the host directory with that owner.
      volume_mount {
        volume      = "data"
        destination = "/var/lib/kafka/data"
        read_only   = false
      }

      # With any KAFKA_* variable set the image ignores its default server.properties, so the
      # whole single-node KRaft configuration is spelled out here.
      env {
        # The image formats the log dirs with this id on first start and checks it afterwards.
        CLUSTER_ID = var.kafka_cluster_id

        KAFKA_NODE_ID                    = "1"
        KAFKA_PROCESS_ROLES              = "broker,controller"
        KAFKA_CONTROLLER_QUORUM_VOTERS   = "1@localhost:9093"
        KAFKA_CONTROLLER_LISTENER_NAMES  = "CONTROLLER"
        KAFKA_INTER_BROKER_LISTENER_NAME = "INTERNAL"
        KAFKA_LISTENERS                  = "INTERNAL://0.0.0.0:${var.kafka_internal_port},HOST://0.0.0.0:${var.kafka_host_port},CONTROLLER://localhost:9093"
        # NOMAD_ADDR_kafka is the node address and the port Docker publishes there: what another
        # job on another address has to dial.
        KAFKA_ADVERTISED_LISTENERS           = "INTERNAL://${NOMAD_ADDR_kafka},HOST://localhost:${var.kafka_host_port}"
        KAFKA_LISTENER_SECURITY_PROTOCOL_MAP = "CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT,HOST:PLAINTEXT"

        # One broker: every internal topic has exactly one replica, or it is never created.
        KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR                 = "1"
        KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR         = "1"
        KAFKA_TRANSACTION_STATE_LOG_MIN_ISR                    = "1"
        KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR = "1"
        KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR            = "1"
        KAFKA_DEFAULT_REPLICATION_FACTOR                       = "1"
        KAFKA_MIN_INSYNC_REPLICAS                              = "1"
        # No other group members will ever join: do not wait 3 s before the first rebalance.
        KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS = "0"

        KAFKA_LOG_DIRS = "/var/lib/kafka/data"

        # kafka-server-start.sh defaults to a 1 GB heap, which Nomad's default 300 MB limit
        # OOM-kills (exit 137). 512 MB heap + metaspace, threads and page cache fit in 1024 MB.
        KAFKA_HEAP_OPTS = "-Xms512m -Xmx512m"
      }

      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }
}
