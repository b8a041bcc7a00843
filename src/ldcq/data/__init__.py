"""Minari I/O, dataset generation, windows, normalization and DataModules (no model code)."""
