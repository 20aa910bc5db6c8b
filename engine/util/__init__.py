"""Leaf helpers any layer may use (optional imports, validated schemas, progress bars, plots). Imports
only radflash.errors.
"""
