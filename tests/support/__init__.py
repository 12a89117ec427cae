"""Test support shared by the tiers: job texts for the Nomad API double, small servers, helpers."""
