"""Data sources: where a dataset's raw files come from, and its manifest."""
