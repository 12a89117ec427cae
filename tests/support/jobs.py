"""The jobs the tests submit to the Nomad API double (its HCL subset), in one place.

`web_job()`: the client and deploy tests' `web` job. Every variant is the same job: `image` (and `version`)
variables, one `frontend` group running `server`; the options add what a test needs (canaries, a service, a
second group with its own update block). `APP_JOB`: the app's job, as `deploy.app` submits it.
"""

from __future__ import annotations

_VARIABLE = """variable "{name}" {{
  description = "the {name}"
  type        = string
  default     = "{default}"
}}
"""


def web_job(
    *,
    count: int = 1,
    canary: int | None = None,
    auto_promote: bool | None = None,
    cpu: int | None = 100,
    memory: int = 128,
    ports: bool = False,
    service: bool = False,
    backend: bool = False,
    version_variable: bool = False,
) -> str:
    """The `web` job's HCL. `version_variable`: declare `version` too (deploy.app passes it); `backend`: a
    second group (`worker`, image `<image>-worker`) that promotes its canaries itself."""
    variables = [_VARIABLE.format(name="image", default="web:1")]
    if version_variable:
        variables.append(_VARIABLE.format(name="version", default="1"))
    update = ["    max_parallel = 1"]
    if canary is not None:
        update.append(f"    canary       = {canary}")
    if auto_promote is not None:
        update.append(f"    auto_promote = {str(auto_promote).lower()}")
    update.append("    auto_revert  = true")
    resources = ([f"        cpu    = {cpu}"] if cpu is not None else []) + [f"        memory = {memory}"]
    frontend = [
        '  group "frontend" {',
        f"    count = {count}",
        *(
            ["    service {", '      name     = "web"', '      provider = "nomad"', "    }"]
            if service
            else []
        ),
        '    task "server" {',
        '      driver = "docker"',
        "      config {",
        "        image = var.image",
        *(['        ports = ["http"]'] if ports else []),
        "      }",
        "      resources {",
        *resources,
        "      }",
        "    }",
        "  }",
    ]
    groups = ["\n".join(frontend)]
    if backend:
        groups.append(
            "\n".join(
                [
                    '  group "backend" {',
                    "    count = 1",
                    "    update {",
                    "      auto_promote = true",
                    "    }",
                    '    task "worker" {',
                    '      driver = "docker"',
                    "      config {",
                    '        image = "${var.image}-worker"',
                    "      }",
                    "      resources {",
                    f"        memory = {memory}",
                    "      }",
                    "    }",
                    "  }",
                ]
            )
        )
    job = "\n".join(['job "web" {', '  datacenters = ["dc1"]', "  update {", *update, "  }", ""])
    return "\n" + "\n".join(variables) + "\n" + job + "\n" + "\n\n".join(groups) + "\n}\n"


#: The app's job as nomad/service.nomad.hcl shapes it (image and version variables, one canary promoted by
#: the deploy), small enough for the double.
APP_JOB = """\
variable "image" {
  default = "infra-lab/app:dev"
}

variable "version" {
  default = "dev"
}

job "app" {
  type = "service"

  meta {
    version = var.version
  }

  update {
    max_parallel = 1
    canary       = 1
    auto_promote = false
    auto_revert  = true
    health_check = "checks"
  }

  group "app" {
    count = 1

    task "app" {
      driver = "docker"

      config {
        image = var.image
      }

      resources {
        memory = 128
      }
    }
  }
}
"""
