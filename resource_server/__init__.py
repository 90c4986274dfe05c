"""The gateway app: data model, admin, OpenAI-compatible API, auth and dispatch to model servers."""
