"""Sources: file discovery, DICOM/image decoding, selection rules, safe output names. Imports only
radflash.errors, radflash.util, radflash.preprocess.
"""
