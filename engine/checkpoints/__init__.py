"""The checkpoint format (safetensors + config + tokenizer), validation, random checkpoints, score-
calibration application and converters/. Imports models, tokenizer, findings, errors, util.
"""
