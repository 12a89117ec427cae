"""infra-lab: reproducible local infrastructure (QEMU VM -> cloud-init -> Nomad -> Kafka, Postgres, app).

Packages from the bottom up (ARCHITECTURE.md): `core` (what every layer uses), then two branches, the VM
(`guest`, `vm`) and Nomad (`nomad`), joined only by `compose` (the project's choices: build, release, bake,
up). `tasks.py` at the repository root is a thin invoke layer over them; `cli.py` is the `inv` program.
"""

from pathlib import Path

#: The repository root: data directories (cloud-init/, vm/, nomad/, app/) live beside the package.
ROOT = Path(__file__).resolve().parent.parent
