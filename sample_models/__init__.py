"""Small reference CNNs for vconvert's demo, tests and benchmarks (``--arch sample_models.<module>:<function>``)."""
