"""Adapters: the gateway's end of external stores and channels (below services, beside auth and dispatch)."""
