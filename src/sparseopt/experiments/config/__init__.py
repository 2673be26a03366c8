"""Typed YAML configs: the schema, loading and validation."""
