from django.conf import settings
from django.contrib import admin
from django.contrib.staticfiles.views import serve as serve_static
from django.urls import URLPattern, URLResolver, path, re_path

from resource_server.api.urls import api

urlpatterns: list[URLPattern | URLResolver] = [
    path("admin/", admin.site.urls),
    path("resource_server/", api.urls),
]

if not settings.GATEWAY.is_production:
    # In production nginx serves /static/; the embedded default serves the admin's assets itself.
    urlpatterns.append(re_path(r"^static/(?P<path>.*)$", serve_static, {"insecure": True}))
