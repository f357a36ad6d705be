"""The errors ditrt raises for user mistakes.

Every :class:`DitrtError` carries a message that names the problem *and* the fix, on one line.
The CLI turns them into that line plus a non-zero exit; anything else that escapes is a bug.
"""


class DitrtError(Exception):
    """A user-facing error: bad input, missing dependency, incompatible artifact."""

    exit_code = 2


class CheckpointError(DitrtError):
    """A checkpoint that cannot be read, is unsafe, or belongs to another architecture."""


class ConfigError(DitrtError):
    """An option or combination of options that cannot work."""


class InputError(DitrtError):
    """Wrong shapes, dtypes or values handed to a model or sampler (e.g. class id out of range)."""


class ArtifactError(DitrtError):
    """A recipe, ONNX file or engine that does not match what it is used with."""


class MissingDependencyError(DitrtError):
    """An optional dependency (TensorRT, onnxruntime-gpu, diffusers, ...) is not installed."""
