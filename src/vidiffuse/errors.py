"""User-facing errors: the CLI and the HTTP layer turn these into one clear line, never a traceback."""


class VidiffuseError(Exception):
    """Base class for errors caused by bad input or environment rather than a bug."""


class VideoReadError(VidiffuseError):
    """A video file is missing, empty, corrupt or in a format we cannot decode."""


class VideoWriteError(VidiffuseError):
    """A video could not be written (unwritable path, bad tensor)."""


class ModelLoadError(VidiffuseError):
    """A model directory is missing, incomplete or corrupt."""


class ConfigError(VidiffuseError):
    """A setting is out of range or a config file is malformed."""
