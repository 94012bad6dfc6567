"""switchyard's merger package."""
