"""Real servers started by test fixtures (PostgreSQL, a Kafka-protocol broker, a Docker engine).

Each starts on a free loopback port or a private socket under a temporary directory, waits until it really
answers, and is stopped by the PID it was started with. Fixtures in the tiers' conftest.py wrap them.
"""
