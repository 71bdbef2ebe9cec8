"""The LoRA technique itself: settings, the layer, targeting, the model-level operations."""
