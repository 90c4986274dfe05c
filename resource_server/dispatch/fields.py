"""Field types the backends' config models share (no backend owns them)."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

# The name of an environment variable that holds a secret (the config names it; it never holds the secret).
EnvVarName = Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]*$", max_length=128)]
