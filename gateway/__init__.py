"""Django project of the inference gateway: settings, URLs and the ASGI/WSGI entry points."""
