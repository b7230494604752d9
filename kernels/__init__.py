"""Custom kernels of ssrengine, each with a pure-PyTorch reference (imported as ssrengine.kernels)."""

from ssrengine.kernels.cross_entropy import (
    SequenceScores,
    fused_linear_cross_entropy,
    sequence_log_likelihood,
)

__all__ = ["SequenceScores", "fused_linear_cross_entropy", "sequence_log_likelihood"]
