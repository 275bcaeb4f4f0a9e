"""Tile embedding: backbones that map tiles to feature vectors, and per-slide extraction."""
