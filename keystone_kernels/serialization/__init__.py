"""Keystone adapters (the trained values only) and the merged save of a patched model."""
