from pathlib import Path


class ParagonError(Exception):
    """A user-facing failure: the CLI prints its message on one line and exits non-zero."""


def require_file(path: Path | str, what: str) -> Path:
    """`path` as a Path if it is a file; otherwise one clear line that says whether it is missing
    or a folder (a folder given where a file belongs is not "does not exist")."""
    path = Path(path)
    if path.is_dir():
        raise ParagonError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise ParagonError(f"{what} {path} does not exist")
    return path


def metadata_int(value: str | None, key: str, where: Path | str) -> int | None:
    """An integer metadata field (e.g. scale), None when absent; a non-integer value is one line."""
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    if not text.isdigit():
        raise ParagonError(f"{where}: metadata {key}={text!r} is not a whole number")
    return int(text)
