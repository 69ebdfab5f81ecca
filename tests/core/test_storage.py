"""Study storages (kvtune/storage.py): parsing, early checks, redaction, and trials whose process was killed.

The SIGKILL tests run a real Optuna study in a child process through :func:`kvtune.storage.open_storage` (the
storage ``recommend`` uses), kill it with SIGKILL in the middle of a trial, and resume the study the way
``recommend`` does. A full ``kvtune recommend`` run killed the same way is ``test_cli.py``'s
``test_recommend_sigkill_then_resume`` (minutes: opt-in).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from kvtune.errors import UserError
from kvtune.storage import (check_storage, fail_dead_trials, heartbeat_settings, open_storage, parse_storage,
                            redact_text, redact_url)

CHILD = r"""
import sys, time
import optuna
from kvtune.storage import open_storage, mark_worker
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(storage=open_storage(sys.argv[1]), study_name="s", load_if_exists=True)
def objective(trial):
    mark_worker(trial)
    x = trial.suggest_float("x", 0.0, 1.0)
    if trial.number == 2:
        print("RUNNING", flush=True)
        time.sleep(600)  # killed here
    return x
study.optimize(objective, n_trials=5)
"""


def test_redaction_of_urls_and_library_errors():
    assert redact_url("postgresql://kv:s3cret@db:5432/optuna") == "postgresql://kv:***@db:5432/optuna"
    assert redact_url("sqlite:///kvtune-study.db") == "sqlite:///kvtune-study.db"
    assert redact_url("postgresql://u@h/db?password=s3cret&sslmode=require") == \
        "postgresql://u@h/db?password=***&sslmode=require"
    url = "postgresql://u:p%40ss%3Aword@h/db"
    assert redact_text('FATAL: password authentication failed; dsn "p@ss:word" p%40ss%3Aword', url).count("***") == 2
    assert redact_url("sqlite:///x\x1b]0;t\x07.db") == "sqlite:///x\\x1b]0;t\\x07.db"


@pytest.mark.parametrize("value, kind, file", [
    ("sqlite:///a/b.db", "rdb", "a/b.db"), ("sqlite:////abs/b.db", "rdb", "/abs/b.db"), ("study.db", "rdb", "study.db"),
    ("journal:///tmp/j.log", "journal", "/tmp/j.log"), ("journal:rel/j.log", "journal", "rel/j.log"),
    ("j.log", "journal", "j.log"), ("postgresql://u:p@h/db", "rdb", None),
])
def test_parse_storage(value, kind, file):
    spec = parse_storage(value)
    assert spec.kind == kind and (spec.file == (Path(file) if file else None))


@pytest.mark.parametrize("value, fragment", [
    ("", "empty"), ("notes.txt", "not a storage URL"), ("journal:", "no journal file path"),
    ("sqlite://rel.db", "three slashes"), ("postgresql://u:p@ss@h/db", "percent-encode it"),
    ("sqlite:////nonexistent-dir/x.db", "folder /nonexistent-dir does not exist"),
    ("foo://x", "cannot open"),
])
def test_bad_storage_is_one_line(value, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        check_storage(value)
    assert "\n" not in str(info.value)


def test_check_creates_nothing(tmp_path):
    check_storage(f"sqlite:///{tmp_path}/new.db")
    check_storage(str(tmp_path / "new.log"))
    assert list(tmp_path.iterdir()) == []


def test_heartbeat_settings(monkeypatch):
    monkeypatch.setenv("KVTUNE_HEARTBEAT_INTERVAL", "2")
    monkeypatch.setenv("KVTUNE_HEARTBEAT_GRACE", "5")
    assert heartbeat_settings() == (2, 5)
    monkeypatch.setenv("KVTUNE_HEARTBEAT_GRACE", "1")
    with pytest.raises(UserError, match="must be longer than the interval"):
        heartbeat_settings()


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_sigkill_mid_trial_then_resume(tmp_path, monkeypatch, kind):
    url = f"sqlite:///{tmp_path}/study.db" if kind == "sqlite" else f"journal:///{tmp_path}/study.log"
    monkeypatch.setenv("KVTUNE_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("KVTUNE_HEARTBEAT_GRACE", "2")
    child = subprocess.Popen([sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE, text=True,
                             env={**os.environ})
    assert child.stdout is not None and child.stdout.readline().strip() == "RUNNING"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    study = optuna.load_study(study_name="s", storage=open_storage(url))
    before = {t.number: t.params for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert sorted(before) == [0, 1]
    assert [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))] == [2]
    time.sleep(3)  # past the grace period

    fail_dead_trials(study)  # journal: the dead worker's trial; sqlite: the heartbeat does it in optimize()
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)

    trials = study.get_trials()
    states = {t.number: t.state for t in trials}
    assert not [n for n, s in states.items() if s == optuna.trial.TrialState.RUNNING], states
    assert states[2] == optuna.trial.TrialState.FAIL
    after = {t.number: t.params for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert all(after[n] == p for n, p in before.items())  # no finished trial lost or changed
    retried = [t for t in trials if t.number > 2 and t.state == optuna.trial.TrialState.COMPLETE]
    assert retried and retried[0].params == next(t.params for t in trials if t.number == 2)  # measured again
