"""The end-to-end run (`nox -s e2e`): pytest tests over the real `inv` CLI; its helpers in harness.py."""
