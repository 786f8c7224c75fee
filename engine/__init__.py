"""tractrain.engine."""
