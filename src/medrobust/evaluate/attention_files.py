"""File names in a slide_attention job's folder (docs/architecture.md, "Attention"), apart
from the analysis so that the report reads them without importing slides and tiling."""

TILES_TABLE = "tiles.csv"
LOCALISATION_TABLE = "localisation.csv"
TOP_K_TABLE = "top_k.csv"
SUMMARY = "summary.json"
HEATMAPS = "heatmaps"
