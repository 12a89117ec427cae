"""The project's choices, composed by calling the layers below: the app image, the CA, the ingress's TLS,
the release policy, bakes, and `up` / `down` / `status`."""
