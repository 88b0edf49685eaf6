"""The one exception type of the method: every message names what is wrong and what would be right."""


class ShareLoraError(ValueError):
    """Invalid ShareLoRA configuration, model, or adapter files."""
