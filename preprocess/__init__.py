"""Visual-concept preprocessing (spec §5): concept vocabulary, CLIP embeddings, top-k concept
assignment and CLIP-score filtering. The top-level `*.py` commands are thin wrappers over these
modules; see docs/preprocessing.md for the order to run them in."""
