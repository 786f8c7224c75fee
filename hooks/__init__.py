"""tractrain.hooks."""
