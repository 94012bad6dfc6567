"""switchyard's loadtests package."""
