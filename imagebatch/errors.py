"""User-facing errors: each names the field or file and says what to change."""

from __future__ import annotations

from pydantic import ValidationError


class ImageBatchError(Exception):
    """An error the user can fix; its message is shown as-is, without a traceback."""


class SpecError(ImageBatchError):
    """The manifest is invalid."""


class PromptFileError(ImageBatchError):
    """A prompt file cannot be read or parsed."""


class ModelLoadError(ImageBatchError):
    """The model cannot be found or loaded."""


# Tags pydantic adds to the location of an error inside a union branch (validator wrappers,
# `function-...`, are dropped by prefix below); they mean nothing to a user.
_UNION_TAGS = {
    "str",
    "PromptItem",
    "int",
    "constrained-str",
    "literal['auto']",
}


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: `spec.generation.width: must be a multiple of 8 (got 500; try 496)`."""
    lines: list[str] = []
    seen: set[str] = set()
    for e in err.errors():
        parts = [str(p) for p in e["loc"] if str(p) not in _UNION_TAGS and not str(p).startswith("function-")]
        path = ".".join([prefix, *parts] if prefix else parts) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling (kubectl explain imagebatchjob.spec lists fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        line = f"{path}: {msg}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)
