"""Language models: loading, data, training (causal LM and classification), generation."""
