"""infra/compose/stack.py against the STATEFUL Nomad API double: `down` purges the jobs and stops the VM, and
stops the VM even when Nomad refuses the purge."""

from __future__ import annotations

from typing import Any

import pytest
from support.nomad_client import DEPLOY_CAPS, client_for

from infra.compose import stack
from infra.core.errors import DeployError
from infra.nomad import rollout


def test_down_with_a_deploy_token_purges_and_stops_the_vm(
    doubles: Any, web: Any, make_cfg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.vm import lifecycle

    d = doubles(acl_tokens={"deploy": DEPLOY_CAPS})
    c = client_for(d, token="deploy")
    path = web()
    rollout.deploy_job(c, path, timeout=120)
    stopped: list[bool] = []
    monkeypatch.setattr(lifecycle, "stop", lambda cfg: stopped.append(True))
    stack.down(make_cfg(deploy={"ingress_job": str(path)}), client=c)
    assert stopped == [True] and "web" not in d.jobs


def test_down_stops_the_vm_even_when_the_purge_is_refused(
    doubles: Any, web: Any, make_cfg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.vm import lifecycle

    d = doubles(acl_token="admin", acl_tokens={"reader": {"node:read", "read-job"}})
    path = web()
    rollout.deploy_job(client_for(d, token="admin"), path, timeout=120)
    stopped: list[bool] = []
    monkeypatch.setattr(lifecycle, "stop", lambda cfg: stopped.append(True))
    with pytest.raises(DeployError) as info:
        stack.down(make_cfg(deploy={"ingress_job": str(path)}), client=client_for(d, token="reader"))
    assert stopped == [True]
    assert "the VM is stopped, but the jobs were not purged" in str(info.value)
    assert "Permission denied" in str(info.value) and "web" in d.jobs
