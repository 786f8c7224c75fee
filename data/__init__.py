"""tractrain.data."""
