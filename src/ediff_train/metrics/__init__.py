"""Offline metrics (FID, CLIP score) computed with local feature extractors only."""
