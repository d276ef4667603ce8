"""Data-free initialisation of versatile layers from pretrained dense weights (docs/FIT.md)."""
