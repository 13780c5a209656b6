"""The core: load a VLM, name its sites, type its positions, run it with caches and interventions."""
