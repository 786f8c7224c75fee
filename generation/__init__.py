"""Model inference: tracking with a trained model (the generation contract)."""
