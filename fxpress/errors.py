"""One small error hierarchy for everything fxpress raises on purpose.

Every message names what failed (the pass, the node, the model) and what
the user can do about it.  The CLI prints these as one line; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of `err`'s message, at most `limit` characters ("" for an empty message):
    what a one-line error quotes of the exception beneath it."""
    lines = str(err).strip().splitlines()
    return lines[0].strip()[:limit] if lines else ""


class FxpressError(Exception):
    """Base of every deliberate fxpress error."""


class CaptureError(FxpressError):
    """A model could not be captured into the IR."""


class PipelineError(FxpressError):
    """A pipeline string or pass option is malformed or unknown."""


class OptionError(PipelineError):
    """A pass option has a value the pass cannot use (raised when the pass is made)."""


class PassError(FxpressError):
    """A pass failed while running, or its result failed verification."""

    def __init__(self, message: str, pass_name: str | None = None, ran_before: tuple[str, ...] | None = None):
        self.detail = message
        self.pass_name = pass_name
        self.ran_before = None if ran_before is None else tuple(ran_before)
        if pass_name is not None and ran_before is not None:
            before = ", ".join(ran_before) if ran_before else "none"
            message = f"pass '{pass_name}' failed: {message} (passes run before it: {before})"
        elif pass_name is not None:
            message = f"pass '{pass_name}' failed: {message}"
        super().__init__(message)

    def in_pipeline(self, pass_name: str, ran_before: tuple[str, ...]) -> PassError:
        """The same error (same class) naming the pass that failed and the passes that ran before it.

        The pass manager calls this: a pass raises with what it knows, the manager adds where it was.
        """
        placed = type(self).__new__(type(self))
        PassError.__init__(placed, self.detail, self.pass_name or pass_name, ran_before)
        placed.__dict__.update({k: v for k, v in self.__dict__.items()
                                if k not in ("detail", "pass_name", "ran_before")})
        return placed


class PreconditionError(PassError):
    """A pass was given a graph or context it cannot work on."""


class PostconditionError(PassError):
    """A pass returned a graph that breaks what the pass promises."""


class VerificationError(PassError):
    """A graph is malformed or its metadata disagrees with it."""


class NumericError(PassError):
    """A semantics-preserving pass changed the model's outputs."""


class CalibrationError(FxpressError):
    """Calibration data does not fit the model's inputs."""


class DataError(FxpressError):
    """Evaluation or calibration data is missing, empty, unknown, or does not fit the model or its task."""


class RecipeError(FxpressError):
    """A recipe file is malformed: an unknown key, a value of the wrong type, an unknown source or target."""


class ZooError(FxpressError):
    """A zoo model or dataset is unknown or its package is missing."""


class LoweringError(FxpressError):
    """A graph could not be lowered to a backend."""


class ArtifactError(FxpressError):
    """A compiled artifact is missing, tampered with or mismatched."""


class GenerationError(FxpressError):
    """Generation cannot run: the model is not a supported decoder, or the cache policy or input is bad."""
