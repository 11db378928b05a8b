"""Command-line entry points; the repository-root scripts are thin wrappers around these."""
