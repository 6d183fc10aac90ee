"""Segment-aware attention: masks for every backend, and SkyLadder."""
