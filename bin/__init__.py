"""tractrain.bin."""
