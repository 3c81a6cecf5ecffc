"""Data in and out: item texts, interactions, and atomic Parquet writing."""
