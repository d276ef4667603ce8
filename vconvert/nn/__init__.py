"""The versatile layer and the pure algebra it is built from (docs/ALGEBRA.md)."""
