"""Error types users see.

Every failure a user can cause (a bad file, checkpoint, prompt list or flag) raises a subclass of
:class:`RadflashError` whose message is one line naming the file and the reason; the CLI turns
these into clean exit-1 messages instead of tracebacks, and batch jobs record them per file.
"""

from __future__ import annotations


class RadflashError(Exception):
    """Base class for errors caused by user input rather than by bugs."""


class CheckpointError(RadflashError):
    """A checkpoint folder/file is missing, not safetensors, or does not match its config."""


class InputError(RadflashError):
    """Images, prompts or options passed to the API have the wrong shape, type or content."""


class ImageLoadError(RadflashError):
    """An image file could not be read or decoded (the run records it as *failed*)."""


class BackendUnavailable(RadflashError):
    """An optional backend (TensorRT, ONNX Runtime CUDA, ...) is not installed or has no device."""


class MissingDependency(BackendUnavailable):
    """An optional package is not installed; the one-line message names the extra that installs it.

    A subclass of :class:`BackendUnavailable` so that code falling back from a missing backend
    (``backend auto`` → eager) keeps working when the backend's package is the thing missing.
    """
