"""ssrengine: Selective Self-Rehearsal fine-tuning."""

__version__ = "0.1.0"

IGNORE_INDEX = -100  # label of every token that is not supervised (prompt, padding)
