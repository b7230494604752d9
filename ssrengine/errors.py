"""One error type for bad input: it names where the problem is."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a file, line, field or argument that cannot be used.

    The CLI prints it as one line (``error: FILE:LINE: field 'x': message``) and exits 2.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message, self.file, self.line, self.field = message, file, line, field
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        what = f"field '{field}': " if field is not None else ""
        super().__init__(f"{where}{what}{message}")
