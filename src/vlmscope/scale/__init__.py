"""Running vlmscope at scale: memory planning and many processes (torchrun)."""
