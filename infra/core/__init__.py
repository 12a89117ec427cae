"""The core every layer uses: errors, output, files, the YAML and HCL readers, waits, the typed
configuration, the state dir's names, a cluster's nodes."""
