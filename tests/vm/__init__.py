"""The VM tier (`nox -s vm`): real boots under TCG through the `inv` CLI."""
