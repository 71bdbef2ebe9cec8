"""One module per file format; each only maps keys and scales onto the canonical Adapter."""
