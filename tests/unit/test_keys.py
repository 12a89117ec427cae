"""infra.guest.keys: the generated keypair's file modes and its generation under concurrency."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from infra.core.state import StatePaths
from infra.guest import keys


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def matches(private: Path, public_line: str) -> bool:
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    derived = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public_line.split()[:2] == derived.decode().split()[:2]


def test_private_key_is_0600_despite_a_world_readable_temp_file(tmp_path: Path) -> None:
    """A `id_ed25519.tmp` left 0644 (by a crash, or by someone else) must not lend its mode to the key."""
    state = StatePaths(tmp_path)
    state.ssh_key.parent.mkdir(mode=0o700)
    planted = state.ssh_key.with_name("id_ed25519.tmp")
    planted.write_text("planted")
    planted.chmod(0o644)
    pair = keys.ensure_generated(state)
    assert mode(state.ssh_key) == 0o600
    assert matches(state.ssh_key, pair.public)
    assert planted.read_text() == "planted"  # not ours: neither used nor removed
    assert sorted(p.name for p in state.ssh_key.parent.iterdir()) == [
        "id_ed25519",
        "id_ed25519.pub",
        "id_ed25519.tmp",
    ]


def test_open_ssh_dir_is_tightened(tmp_path: Path) -> None:
    state = StatePaths(tmp_path)
    keys.ensure_generated(state)
    state.ssh_key.parent.chmod(0o755)
    state.ssh_key.chmod(0o644)
    keys.ensure_generated(state)  # reuse: modes fixed, key kept
    assert mode(state.ssh_key.parent) == 0o700
    assert mode(state.ssh_key) == 0o600


def test_fresh_open_ssh_dir_is_tightened_before_the_key_is_written(tmp_path: Path) -> None:
    state = StatePaths(tmp_path)
    state.ssh_key.parent.mkdir(mode=0o755)
    state.ssh_key.parent.chmod(0o755)  # mkdir's mode is filtered by the umask
    keys.ensure_generated(state)
    assert mode(state.ssh_key.parent) == 0o700
    assert mode(state.ssh_key) == 0o600


def test_concurrent_generation_from_an_empty_state(tmp_path: Path) -> None:
    """Eight callers at once (as several `inv` commands would): no error, one keypair, halves that match."""
    for round_ in range(5):
        state = StatePaths(tmp_path / f"round{round_}")
        barrier = threading.Barrier(8)
        results: list[keys.KeyPair] = []
        errors: list[BaseException] = []

        def generate(
            state: StatePaths,
            barrier: threading.Barrier,
            results: list[keys.KeyPair],
            errors: list[BaseException],
        ) -> None:
            barrier.wait()
            try:
                results.append(keys.ensure_generated(state))
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=generate, args=(state, barrier, results, errors)) for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len({r.public for r in results}) == 1
        assert matches(state.ssh_key, results[0].public)
        assert state.ssh_pubkey.read_text().strip() == results[0].public
        assert sorted(p.name for p in state.ssh_key.parent.iterdir()) == ["id_ed25519", "id_ed25519.pub"]
