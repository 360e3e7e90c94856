"""The HTTP service around the labeler."""
