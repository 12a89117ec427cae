"""nomad"""
