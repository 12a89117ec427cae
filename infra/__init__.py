"""infra-lab: reproducible local infrastructure (QEMU VM -> cloud-init -> Nomad -> Kafka, Postgres, app).

Each module holds one concern; `tasks.py` at the repository root is a thin invoke layer over them.
"""

from pathlib import Path

#: The repository root: data directories (cloud-init/, vm/, nomad/, app/) live beside the package.
ROOT = Path(__file__).resolve().parent.parent
