"""Train specs registered with torchtitan when ``ext.job_config`` is imported."""

from torchtitan.protocols.train_spec import _extra_train_specs, register_train_spec

from ext.models.llama3 import LLAMA3_SPEC_NAME, llama3_train_spec
from ext.models.qwen3 import QWEN3_SPEC_NAME, qwen3_train_spec


def register_all() -> None:
    """Register every spec of this package once (safe to call repeatedly)."""
    if LLAMA3_SPEC_NAME not in _extra_train_specs:
        register_train_spec(LLAMA3_SPEC_NAME, llama3_train_spec())
    if QWEN3_SPEC_NAME not in _extra_train_specs:
        register_train_spec(QWEN3_SPEC_NAME, qwen3_train_spec())
