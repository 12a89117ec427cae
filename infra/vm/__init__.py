"""The VM as a qemu process on this host: host processes and ports, the lock, QMP, the qemu command line,
qemu-img, the cluster switch, base images and bakes, finding the VM, its lifecycle, and the `inv vm.*` verbs."""
