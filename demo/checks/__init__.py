"""Checks of the built demo that need a running engine (kept out of the recipe hash: they change no artifact)."""
