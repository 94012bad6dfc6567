"""switchyard's demo package."""
