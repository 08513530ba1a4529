"""What goes wrong with a checkpoint or a device map, each message naming the cause and the fix."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the checkpoint (file and key), cause and fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No such local directory, no such (accessible) hub repo, or not cached while offline."""


class DeviceMapError(ValueError):
    """A device map that cannot hold the model: the message names what does not fit and the fix."""
