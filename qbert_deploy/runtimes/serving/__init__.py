"""qbert-serve: an export directory behind the KServe v2 / Triton HTTP protocol, with dynamic micro-batching.

Imports neither torch nor transformers: a server needs only onnxruntime, tokenizers and the `[serve]` extra.
"""

from qbert_deploy.runtimes.serving.app import ServeConfig, create_app
from qbert_deploy.runtimes.serving.batcher import Batcher, QueueFull
from qbert_deploy.runtimes.serving.model import (
    CANONICAL,
    ModelDirError,
    ServedFile,
    ServedModel,
    open_served,
    served_file,
)

__all__ = ["CANONICAL", "Batcher", "ModelDirError", "QueueFull", "ServeConfig", "ServedFile", "ServedModel",
           "create_app", "open_served", "served_file"]
