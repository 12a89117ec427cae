"""Test doubles: Nomad's HTTP API (the one service with no real server here)."""
