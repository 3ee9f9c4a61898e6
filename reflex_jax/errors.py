"""The one error type of the project.

Every mistake a user can make (a bad config, a missing file, a damaged checkpoint, a data row the
code cannot use, a command-line slip) raises a `ReflexError` whose message is one sentence naming
the thing and the fix. The CLIs catch `ReflexError` in one place (`reflex_jax.cli.errors_to_exit`)
and print that sentence instead of a traceback. Anything else is a bug and keeps its traceback.

`ReflexError` is a `ValueError`, so code that already catches ValueError keeps working; the
subclasses say which part of the project refused.
"""


class ReflexError(ValueError):
    """A user-fixable mistake; the message is one sentence naming the thing and the fix."""


class ConfigError(ReflexError):
    """A configuration value that cannot work (model, run, mesh or task options)."""


class UsageError(ReflexError):
    """A command-line mistake."""


class DataError(ReflexError):
    """Data that cannot be prepared or read: sources, templates, prepared directories, tasks."""


class MissingFileError(ReflexError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class TokenizerError(DataError):
    """A tokenizer that cannot be loaded or used."""


class CheckpointError(ReflexError):
    """A checkpoint or params directory that is missing, damaged or does not fit the model."""


class TrainingError(ReflexError):
    """A run that cannot start or continue."""


class MeshError(ConfigError):
    """A device mesh that does not fit the devices or the batch."""


class GenerationError(ReflexError):
    """Prompts or sampling settings the generator cannot use."""


class ConvertError(ReflexError):
    """A source checkpoint that cannot be converted to the target model."""
