"""finetune: learn masks and primaries with the original network as teacher (one process or DDP)."""
