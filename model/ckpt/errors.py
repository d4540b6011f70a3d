"""The one exception of model.ckpt, in its own module so that every checkpoint module can raise it."""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the GPT-J shapes it declares."""
