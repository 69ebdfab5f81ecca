"""Optuna storages for kvtune's studies: parse, check early, open, and never print a secret.

Accepted ``--storage`` values (docs/recommend.md):

* ``sqlite:///FILE.db`` (the default, ``kvtune-study.db``) or a bare ``FILE.db`` / ``FILE.sqlite`` path;
* any other SQLAlchemy URL Optuna's RDB storage takes (``postgresql://user:pass@host/db``, ``mysql://...``), the
  database driver installed separately;
* ``journal:///ABS/PATH.log``, ``journal:REL/PATH.log`` or a bare ``FILE.log`` path: Optuna's append-only
  journal file (``JournalStorage`` + ``JournalFileBackend``), for file systems where SQLite locking is not
  trusted (NFS).

RDB storages run Optuna's heartbeat: a worker records a heartbeat every ``KVTUNE_HEARTBEAT_INTERVAL`` seconds
(default 60) while a trial runs; a RUNNING trial whose heartbeat is older than ``KVTUNE_HEARTBEAT_GRACE``
seconds (default 180) belongs to a process that died (SIGKILL, out of memory, a lost host). The next trial any
worker starts on the study marks it FAIL and enqueues the same candidate again (once), so a killed run loses no
finished trial and leaves no trial RUNNING. Optuna's journal storage has no heartbeat: there a RUNNING trial
whose worker was a process of this host that no longer exists is failed and retried the same way when a study
is opened (:func:`fail_dead_trials`); workers record themselves on each trial (:func:`mark_worker`).

:func:`check_storage` runs before any model loads: a malformed URL, a missing driver, an unreachable server or
an unwritable folder is one line at once, and nothing is created for a run that fails later. Every URL kvtune
prints goes through :func:`redact_url`, and every error text from a storage library through
:func:`redact_text`, which removes the password however the library echoed it.
"""

from __future__ import annotations

import inspect
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from kvtune.errors import UserError, printable
from kvtune.io import can_create_in

DEFAULT_HEARTBEAT_INTERVAL = 60  # seconds between heartbeats of a running trial
DEFAULT_HEARTBEAT_GRACE = 180  # seconds without a heartbeat after which a RUNNING trial is declared dead
MAX_RETRY = 1  # a trial killed with its process is measured again once
WORKER_ATTR = "kvtune_worker"  # user attribute on each trial: "host:pid" of the process that ran it

_SECRET_KEYS = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)


@dataclass(frozen=True)
class StorageSpec:
    """A parsed ``--storage``: its kind (``rdb`` or ``journal``), the URL or file Optuna gets, the file for
    file-backed kinds (sqlite, journal), and the text given, for messages (redacted)."""

    kind: str
    target: str
    file: Path | None
    shown: str


def _split_credentials(url: str) -> tuple[str, str, str, str] | None:
    """``(scheme, user, password, after)`` of ``scheme://user:password@after``, or None without credentials.

    The password is what lies between the first ``:`` after the user name and the *last* ``@`` before the path
    or query, so a raw ``@`` or ``:`` inside it still counts as password (SQLAlchemy would split it elsewhere).
    """
    if "://" not in url:
        return None
    scheme, rest = url.split("://", 1)
    head = rest.split("?", 1)[0]
    at = head.rfind("@")
    if at < 0:
        return None
    creds, after = rest[:at], rest[at + 1:]
    user, _, password = creds.partition(":")
    return scheme, user, password, after


def _redact_query(text: str) -> str:
    if "?" not in text:
        return text
    base, query = text.split("?", 1)
    parts = []
    for piece in query.split("&"):
        key, sep, value = piece.partition("=")
        parts.append(f"{key}=***" if sep and value and _SECRET_KEYS.search(unquote(key)) else piece)
    return base + "?" + "&".join(parts)


def redact_url(url: str) -> str:
    """A storage URL safe to print: the password and secret query values replaced by ``***``, control
    characters escaped."""
    split = _split_credentials(url)
    if split is not None:
        scheme, user, password, after = split
        url = f"{scheme}://{user}:***@{after}" if password else f"{scheme}://{user}@{after}"
    return printable(_redact_query(url))


def _secrets(url: str) -> list[str]:
    """Every form in which a library might echo the URL's secrets: raw, percent-decoded, percent-encoded, and
    the pieces of a password split where a URL parser could have split it (``@``, ``:``, ``/``)."""
    found: list[str] = []
    split = _split_credentials(url)
    if split is not None and split[2]:
        password = split[2]
        found += [password, unquote(password), quote(password, safe="")]
        found += [piece for piece in re.split(r"[@:/]", password) if len(piece) >= 2]
    if "?" in url:
        for key, value in parse_qsl(url.split("?", 1)[1], keep_blank_values=False):
            if _SECRET_KEYS.search(key) and value:
                found += [value, quote(value, safe="")]
    return sorted({s for s in found if s}, key=len, reverse=True)


def redact_text(text: str, url: str) -> str:
    """``text`` (an error message from a storage library) with the secrets of ``url`` removed, on one line."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return printable(text, 300)


def _journal_path(value: str) -> str:
    rest = value[len("journal:"):]
    if rest.startswith("///"):
        return rest[2:]
    if rest.startswith("//"):
        return rest[2:]
    return rest


def parse_storage(value: str) -> StorageSpec:
    """Recognize a ``--storage`` value (see the module docstring); :class:`UserError` for anything else."""
    shown = redact_url(value)
    split = _split_credentials(value)
    if split is not None and any(ch in split[2] for ch in "@:/?#"):
        raise UserError(f"--storage {shown}: the password holds a raw '@', ':', '/', '?' or '#', which URL parsers "
                        "split differently; percent-encode it (%40 %3A %2F %3F %23)")
    if not value.strip():
        raise UserError("--storage: empty (use sqlite:///FILE.db, journal:///FILE.log or a database URL)")
    if value.startswith("journal:"):
        path = _journal_path(value)
        if not path:
            raise UserError(f"--storage {shown}: no journal file path (journal:///ABS/PATH.log or journal:PATH.log)")
        return StorageSpec("journal", path, Path(path), shown)
    if "://" not in value:
        suffix = Path(value).suffix.lower()
        if suffix == ".log":
            return StorageSpec("journal", value, Path(value), shown)
        if suffix in (".db", ".sqlite", ".sqlite3"):
            return StorageSpec("rdb", f"sqlite:///{value}", Path(value), shown)
        raise UserError(f"--storage {shown}: not a storage URL (sqlite:///FILE.db, postgresql://..., "
                        "journal:///FILE.log) nor a .db/.log file path")
    scheme = value.split("://", 1)[0].lower()
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise UserError(f"--storage {shown}: malformed URL scheme")
    if scheme == "sqlite":
        rest = value.split("://", 1)[1]
        if rest in ("", "/", "/:memory:"):
            return StorageSpec("rdb", value, None, shown)  # in-memory: one process only
        if not rest.startswith("/"):
            raise UserError(f"--storage {shown}: sqlite URLs take three slashes and a file, e.g. sqlite:///study.db")
        return StorageSpec("rdb", value, Path(rest[1:]), shown)
    return StorageSpec("rdb", value, None, shown)


def heartbeat_settings() -> tuple[int, int]:
    """``(interval, grace)`` in seconds, from ``KVTUNE_HEARTBEAT_INTERVAL`` / ``KVTUNE_HEARTBEAT_GRACE``."""
    values = []
    for name, default in (("KVTUNE_HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL),
                          ("KVTUNE_HEARTBEAT_GRACE", DEFAULT_HEARTBEAT_GRACE)):
        raw = os.environ.get(name, "").strip()
        try:
            value = int(raw) if raw else default
        except ValueError:
            raise UserError(f"{name}={printable(raw, 40)}: expected a whole number of seconds") from None
        if value < 1:
            raise UserError(f"{name}={value}: must be >= 1 second")
        values.append(value)
    interval, grace = values
    if grace <= interval:
        raise UserError(f"KVTUNE_HEARTBEAT_GRACE={grace}: must be longer than the interval ({interval} s)")
    return interval, grace


def _check_file_target(spec: StorageSpec) -> None:
    path = spec.file
    assert path is not None
    if path.is_dir():
        raise UserError(f"--storage {spec.shown}: {printable(str(path))} is a directory, expected a file")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"--storage {spec.shown}: folder {printable(str(folder))} does not exist")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise UserError(f"--storage {spec.shown}: {printable(str(path))} is not readable and writable")
    elif not os.access(folder, os.W_OK | os.X_OK) or not can_create_in(folder):
        raise UserError(f"--storage {spec.shown}: folder {printable(str(folder))} is not writable")


def check_storage(value: str) -> StorageSpec:
    """Check ``--storage`` before any work, creating nothing: a file-backed storage that does not exist yet
    needs a writable folder; one that exists, and any database server, is opened once (driver, reachability,
    credentials, a file that is not a study database)."""
    spec = parse_storage(value)
    if spec.file is not None:
        _check_file_target(spec)
        if not spec.file.exists():
            return spec
    open_storage(spec)
    return spec


def open_storage(spec: StorageSpec | str) -> Any:
    """The Optuna storage object for ``spec`` (RDB storages with heartbeat and retry of dead trials)."""
    import optuna  # deferred: optuna + SQLAlchemy take a second to import

    if isinstance(spec, str):
        spec = parse_storage(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental/deprecation notices about the heartbeat arguments
            if spec.kind == "journal":
                from optuna.storages.journal import JournalFileBackend, JournalStorage

                return JournalStorage(JournalFileBackend(spec.target))
            interval, grace = heartbeat_settings()
            retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
                optuna.storages.RetryFailedTrialCallback
            params = inspect.signature(optuna.storages.RDBStorage).parameters
            callback_arg = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params
                            else "failed_trial_callback")
            return optuna.storages.RDBStorage(spec.target, heartbeat_interval=interval, grace_period=grace,
                                              **{callback_arg: retry_cls(max_retry=MAX_RETRY)})
    except UserError:
        raise
    except ImportError as exc:
        raise UserError(f"--storage {spec.shown}: the database driver is not installed "
                        f"({redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, spec.target)})"
                        ) from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy, sqlite3 and OS errors come in many types; one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"--storage {spec.shown}: cannot open ({type(exc).__name__}: "
                        f"{redact_text(first, spec.target)})") from None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def mark_worker(trial: Any) -> None:
    """Record on ``trial`` which process runs it (read by :func:`fail_dead_trials`)."""
    trial.set_user_attr(WORKER_ATTR, worker_id())


def _dead_here(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return int(pid) == os.getpid()  # our own pid cannot own a trial left from an earlier run


def fail_dead_trials(study: Any) -> int:
    """For storages without a heartbeat (journal): mark FAIL every RUNNING trial whose worker was a process of
    this host that no longer exists, and enqueue its candidate again; returns how many were failed."""
    import optuna

    from optuna.storages import RDBStorage

    if isinstance(study._storage, RDBStorage):  # noqa: SLF001 - the heartbeat does this for RDB storages
        return 0
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR)
        if not isinstance(worker, str) or not _dead_here(worker):
            continue
        if study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):  # noqa: SLF001
            failed += 1
            if t.params:
                study.enqueue_trial(t.params, skip_if_exists=False)
    return failed


__all__ = ["StorageSpec", "check_storage", "fail_dead_trials", "heartbeat_settings", "mark_worker", "open_storage",
           "parse_storage", "redact_text", "redact_url"]
