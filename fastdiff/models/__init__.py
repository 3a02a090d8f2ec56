"""Models built from fastdiff.ops (dense products included); parameter names match the original checkpoints."""
