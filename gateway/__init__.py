"""switchyard's gateway package."""
