"""The one exception of model.ckpt, in its own module so that every checkpoint module can raise it."""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the GPT-J shapes it declares."""


def check_names_and_shapes(where: str, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                           noun: str, leftover_note: str = "") -> None:
    """What a checkpoint holds (`found`: name -> shape) is exactly `expected`: the first missing,
    leftover or misshapen entry is named (a `noun` is "tensor" for HF files, "leaf" for native ones)."""
    missing = sorted(set(expected) - set(found))
    leftover = sorted(set(found) - set(expected))
    plural = "leaf(s)" if noun == "leaf" else f"{noun}(s)"
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} {plural}, e.g. {missing[:3]}")
    if leftover:
        raise CheckpointError(f"{where}: {len(leftover)} unexpected {plural}{leftover_note}, e.g. {leftover[:3]}")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(f"{where}: {noun} {name} has shape {tuple(found[name])}, expected {tuple(shape)}")
