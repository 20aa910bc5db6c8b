"""Synthetic phantom radiographs and DICOM archives for bench, tests and training. Imports only
radflash.errors and radflash.util.
"""
