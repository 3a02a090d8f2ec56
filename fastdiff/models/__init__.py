"""Models built from fastdiff.ops and torch's dense conv/linear; parameter names match the original checkpoints."""
