"""Adapters as files: the canonical Adapter (adapter.py), reading and writing (io.py), learned token embeddings
(embeddings.py), and one module per external format that only maps keys and scales onto the canonical form."""
