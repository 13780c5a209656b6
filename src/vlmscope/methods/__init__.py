"""The survey's method families, as functions that take a VLM (or a cache) and return results."""
