from django.apps import AppConfig


class ResourceServerConfig(AppConfig):
    name = "resource_server"
    verbose_name = "Inference gateway"
    default_auto_field = "django.db.models.BigAutoField"
