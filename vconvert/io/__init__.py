"""Untrusted input and durable output: safe loading of model files, the .vc.pt format, atomic writes."""
