"""The component tier (`nox -s component`): real servers and tools, the test double of Nomad's HTTP API."""
