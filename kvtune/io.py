"""File helpers: atomic writes of one file or of a set of files, guarded YAML reads.

Nothing is written in place. One file goes to a temporary file in the target's folder and is renamed over the
target once complete. A set of files (an export) is written into a hidden staging folder first: into a new
folder that is renamed into place whole, or, when the folder exists, moved file by file from a staging
sub-folder (renames within one filesystem, microseconds apart). A run killed at any point leaves no partial
file under a target name; what it staged is hidden and removed by the next run, and a file already holding
exactly the bytes a rerun would write is not a conflict, so the rerun completes the set.

New files get the mode the umask gives (``0666 & ~umask``, as ``open()`` would); a file replaced with
``--force`` keeps its mode.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from kvtune.errors import UserError, printable

MAX_YAML_ALIASES = 100  # kvtune never writes aliases; a document with more is a YAML bomb, not a config
MAX_YAML_DEPTH = 64  # pipelines and profiles nest 4 levels deep
STAGE_MARK = ".kvtune-stage-"  # hidden staging folders: <folder>/.kvtune-stage-<pid>-<random>


def show(path: str | os.PathLike[str]) -> str:
    """A path as messages print it: control characters escaped."""
    return printable(os.fspath(path))


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    return 0o666 & ~current_umask()


def _folder_of(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def _check_target(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise UserError(f"{show(target)}: is a directory, expected a file path")
    if target.exists() and not overwrite:
        raise UserError(f"{show(target)}: already exists (pass --force to overwrite)")


def _write_fd(fd: int, text: str, mode: int) -> None:
    os.fchmod(fd, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically; refuse to replace an existing file unless ``overwrite``."""
    target = Path(path)
    _check_target(target, overwrite)
    folder = _folder_of(target)
    if not folder.exists():
        raise UserError(f"{show(target)}: folder {show(folder)} does not exist")
    mode = (target.stat().st_mode & 0o7777) if target.exists() else new_file_mode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UserError(f"{show(target)}: cannot write here ({exc.strerror})") from None
    try:
        _write_fd(fd, text, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_stages(folder: Path, prefix: str = STAGE_MARK) -> None:
    """Remove staging folders left in ``folder`` by runs that were killed (their process is gone)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        try:
            pid = int(entry.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _same_bytes(path: Path, text: str) -> bool:
    try:
        return path.is_file() and path.read_bytes() == text.encode("utf-8")
    except OSError:
        return False


def check_folder_writable(folder: Path, *, flag: str) -> None:
    """Fail early if ``folder`` cannot be written or created (the nearest existing ancestor must be writable)."""
    if str(folder) == "":
        raise UserError(f"{flag}: empty path")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {show(folder)}: is not a directory")
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{flag} {show(folder)}: {show(probe)} is a file, not a folder")
    if not can_create_in(probe):
        raise UserError(f"{flag} {show(folder)}: folder {show(probe)} is not writable")


def can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: tried for real (permissions alone miss read-only file
    systems and root), the probe removed at once."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".kvtune-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    Path(probe).unlink(missing_ok=True)
    return True


def write_files_atomically(folder: str | os.PathLike[str], files: Mapping[str, str], *, overwrite: bool = False,
                           flag: str = "--out-dir") -> list[Path]:
    """Write ``{filename: text}`` into ``folder`` all at once or not at all (see the module docstring).

    Every target is checked before anything is written: a file that exists is a conflict unless ``overwrite``
    or it already holds exactly ``text``. ``folder`` is created (with its parents) if missing.
    """
    root = Path(folder)
    if str(folder) == "":
        raise UserError(f"{flag}: empty path")
    if root.exists() and not root.is_dir():
        raise UserError(f"{show(root)}: is not a directory ({flag})")
    targets = {name: root / name for name in files}
    for name, target in targets.items():
        if target.is_dir():
            raise UserError(f"{show(target)}: is a directory, expected a file path")
        if target.exists() and not overwrite and not _same_bytes(target, files[name]):
            raise UserError(f"{show(target)}: already exists (pass --force to overwrite)")
    mode = new_file_mode()
    if not root.exists():
        parent = root.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{show(root)}: cannot create the output folder ({exc.strerror})") from None
        remove_stale_stages(parent, prefix=f".{root.name}{STAGE_MARK}")
        stage = _make_stage(parent, f".{root.name}{STAGE_MARK}", root)
        try:
            for name, text in files.items():
                _write_new(stage / name, text, mode)
            os.chmod(stage, 0o777 & ~current_umask())
            _fsync_dir(stage)
        except BaseException as exc:
            shutil.rmtree(stage, ignore_errors=True)
            if isinstance(exc, OSError):
                raise UserError(f"{show(root)}: cannot write the exports ({exc.strerror})") from None
            raise
        try:
            os.rename(stage, root)  # atomic: the folder appears with every file in it
            _fsync_dir(parent)
            return [targets[name] for name in files]
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            if not root.is_dir():
                raise UserError(f"{show(root)}: cannot create the output folder ({exc.strerror})") from None
            # another process created the folder meanwhile: move the files in one by one below
    remove_stale_stages(root)
    stage = _make_stage(root, STAGE_MARK, root)
    try:
        for name, text in files.items():
            if not _same_bytes(targets[name], text):
                keep = targets[name].stat().st_mode & 0o7777 if targets[name].exists() else mode
                _write_new(stage / name, text, keep)
        _fsync_dir(stage)
        for name in files:
            staged = stage / name
            if staged.exists():
                os.replace(staged, targets[name])
        _fsync_dir(root)
    except OSError as exc:
        raise UserError(f"{show(root)}: cannot write the exports ({exc.strerror})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [targets[name] for name in files]


def _make_stage(where: Path, prefix: str, root: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=where))
    except OSError as exc:
        raise UserError(f"{show(root)}: cannot write here ({exc.strerror})") from None


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    _write_fd(fd, text, mode)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike[str], *, overwrite: bool = True, flag: str | None = None) -> Path:
    """Fail early (before minutes of work) if ``path`` cannot be written later."""
    if os.fspath(path) == "":
        raise UserError(f"{flag or 'output'}: empty path")
    target = Path(path)
    folder = _folder_of(target)
    _check_target(target, overwrite)
    if not folder.is_dir():
        raise UserError(f"{show(target)}: folder {show(folder)} does not exist")
    if not can_create_in(folder):
        raise UserError(f"{show(target)}: folder {show(folder)} is not writable")
    return target


class _YamlTooComplex(Exception):
    pass


class _GuardedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses alias bombs and documents nested deeper than any kvtune file."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D401 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _YamlTooComplex(f"more than {MAX_YAML_ALIASES} aliases (an alias bomb?)")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlTooComplex(f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str, *, where: str) -> Any:
    """Parse one YAML document safely (no Python tags, no alias bombs, bounded depth); one-line errors."""
    try:
        loader = _GuardedLoader(text)  # PyYAML's reader rejects control characters here, before parsing
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: invalid YAML ({printable(str(exc).splitlines()[0], 200)})") from None
    try:
        return loader.get_single_data()
    except _YamlTooComplex as exc:
        raise UserError(f"{where}: refused: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}:{at} invalid YAML ({printable(problem, 200)})") from None
    except RecursionError:
        raise UserError(f"{where}: refused: nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # a scalar PyYAML cannot build: a 5000-digit int, a 30th of February
        reason = str(exc).splitlines()[0].split("; use sys.set_int_max_str_digits")[0]
        raise UserError(f"{where}: invalid YAML ({printable(reason, 200)})") from None
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML document with :func:`parse_yaml`; one-line errors with the file and line."""
    source = Path(path)
    where = show(source)
    if os.fspath(path) == "":
        raise UserError("empty path given for a YAML file")
    if not source.exists():
        raise UserError(f"{where}: no such file")
    if source.is_dir():
        raise UserError(f"{where}: is a directory, expected a YAML file")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{where}: cannot read ({exc.strerror})") from None
    return parse_yaml(text, where=where)


def dump_yaml(data: Any) -> str:
    """The one YAML style kvtune writes: block style, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
