"""Nomad, knowing nothing of this project: the HTTP client, cluster readiness, the deploy engine (rollout),
the job-spec rules (`python -m infra.nomad.speclint`)."""
