"""Selectors: read-only queries, named <entity>_<get|list|resolve>."""
