"""The unit tier (`nox -s unit`): pure Python, no processes or sockets (conftest.py guards it)."""
