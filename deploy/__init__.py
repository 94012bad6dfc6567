"""switchyard's deploy package."""
