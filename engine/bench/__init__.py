"""Benchmarks: harness, inputs, report formatting, plots, the reference model. Imports anything in the
engine except cli; never training.
"""
