"""Leaf helpers any layer may use (optional imports, validated schemas, progress bars, plots, scratch SQLite). Imports
only radflash.errors.
"""
