"""Dispatch: one backend module per way of reaching a model server, chosen per Endpoint."""
