"""What runs in the guest and how it is reached: the SSH keypair, HashiCorp's key pin, the NoCloud seed,
the serial console, the guest over SSH."""
