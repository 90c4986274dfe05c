"""Code that runs on the clusters, through Globus Compute or a local process pool: `inference` beside vLLM on the
compute nodes, `scheduler_jobs` on a login node (the batch scheduler's jobs).

No Django and nothing beyond the standard library: the registered functions run on endpoints that
have only Python and the Globus Compute endpoint installed.

Register and submit them with these serialization strategies (import paths, so that this package does
not import the SDK), e.g. ``ComputeSerializer(strategy_code=CODE_STRATEGY, strategy_data=DATA_STRATEGY)``:
the function travels as source text, because the SDK's default (DillCode) pickles it by reference to
this package, which endpoints do not have; its arguments travel as JSON, which cannot carry code. The
endpoint configs in ``endpoint_configs/`` allow exactly these two (``allowed_serializers``).
"""

from compute_functions.inference import inference
from compute_functions.scheduler import scheduler_jobs

CODE_STRATEGY = "globus_compute_sdk.serialize.PureSourceTextInspect"
DATA_STRATEGY = "globus_compute_sdk.serialize.JSONData"

__all__ = ["CODE_STRATEGY", "DATA_STRATEGY", "inference", "scheduler_jobs"]
