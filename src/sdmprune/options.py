"""Config dataclass fields carry their own help, which the CLI turns into `--field-name` options."""


def described(text: str) -> dict:
    """`field(metadata=described("..."))`: the option's --help text."""
    return {"help": text}
