"""The segment verb: prompts, grounding, writers (PNG, NPZ, NIfTI, DICOM SEG, previews). Imports io,
archive.decode_pool/batching, api, kernels, findings, util.
"""
