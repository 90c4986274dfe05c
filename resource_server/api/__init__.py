"""The HTTP API (django-ninja), mounted at /resource_server/."""
