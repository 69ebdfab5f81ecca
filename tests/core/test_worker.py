"""``kvtune worker`` on shared storages: a real PostgreSQL server and Optuna's journal file.

Each storage gets one study created by ``kvtune recommend`` (in-process, the quick evaluation set), then two
``kvtune worker`` processes join it at the same time. One of them is killed with SIGKILL in the middle of a
trial (stopped with SIGSTOP first, so the kill lands while the storage shows its trial RUNNING); the other keeps
going and, once the dead worker's trial is stale (PostgreSQL: Optuna's heartbeat, grace 2 s here; journal: the
dead-process sweep after each trial), marks it FAIL and measures the same candidate again. Checked: trial
numbers unique and gap-free, every trial finished before the kill still finished with the same parameters and
measured pipeline, 0 trials left RUNNING, the killed candidate measured again, the surviving worker's trials all
counted.

The PostgreSQL server is Debian's package (``apt-get install postgresql``; ``.ci/run`` installs it): a throwaway
cluster (``initdb`` + ``pg_ctl start`` on a free local port under a temporary folder, run as the ``postgres``
user when the tests run as root), dropped afterwards. Without the binaries or the driver the test is skipped with
the reason.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from kvtune.cli import app
from kvtune.commands.worker import fingerprint_mismatch, worker_seed
from kvtune.storage import WORKER_ATTR, open_storage

pytestmark = pytest.mark.slow
runner = CliRunner()
KVTUNE = str(Path(sys.executable).with_name("kvtune"))
SETUP = ["--quick", "--scenario", "minimal-change", "--hardware", "h100-sxm", "--context", "512"]
ENV = {**os.environ, "KVTUNE_HEARTBEAT_INTERVAL": "1", "KVTUNE_HEARTBEAT_GRACE": "2", "COLUMNS": "200",
       "NO_COLOR": "1"}
S = optuna.trial.TrialState
FINISHED = (S.COMPLETE, S.PRUNED)
SURVIVOR_TRIALS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster on a free local port; its URL (trust authentication, no password)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    pg_ctl = bins[-1] if bins else shutil.which("pg_ctl")
    if not pg_ctl:
        pytest.skip("needs PostgreSQL server binaries (apt-get install postgresql)")
    import sqlalchemy

    try:  # the driver SQLAlchemy maps postgresql:// to (psycopg 3 on SQLAlchemy 2.1, psycopg2 before)
        sqlalchemy.create_engine("postgresql://kvtune@127.0.0.1:1/optuna")
    except ImportError as exc:
        pytest.skip(f"needs SQLAlchemy's PostgreSQL driver ({exc}; pip install 'kvtune[dev]')")
    bindir = Path(pg_ctl).parent
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="kvtune-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to start the server as")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "kvtune"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(pg_ctl), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60", "-o",
                        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=90)
        subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "kvtune",
                        "optuna"], check=True, capture_output=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"PostgreSQL could not start: {exc} {detail.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql://kvtune@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, str(pg_ctl), "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["journal", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "journal":
        return f"journal:///{tmp_path}/study.log"
    return request.getfixturevalue("postgres_url")


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()


def _mid_trial(url: str, name: str, pid: int) -> bool:
    """Whether worker ``pid`` holds a RUNNING trial and has finished at least one before it."""
    mine = [t for t in _trials(url, name) if str(t.user_attrs.get(WORKER_ATTR, "")).endswith(f":{pid}")]
    return any(t.state == S.COMPLETE for t in mine) and any(t.state == S.RUNNING for t in mine)


def test_two_workers_one_killed_mid_trial(storage_url, tmp_path):
    name = f"w-{tmp_path.name}"
    created = runner.invoke(app, ["recommend", *SETUP, "--trials", "1", "--storage", storage_url, "--study-name", name,
                                  "-o", str(tmp_path / "p.yaml"), "--format", "json"], env=ENV)
    assert created.exit_code == 0, created.output
    settings = optuna.load_study(study_name=name, storage=open_storage(storage_url)).user_attrs["settings"]
    assert settings["scenario"] == "minimal-change" and settings["quick"] is True and settings["hardware"] == "h100-sxm"

    cmd = [KVTUNE, "worker", "--storage", storage_url, "--study", name, "--format", "json"]
    victim = subprocess.Popen([*cmd, "--trials", "30"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    survivor = subprocess.Popen([*cmd, "--trials", str(SURVIVOR_TRIALS)], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    before: dict[int, tuple[dict, dict]] = {}
    killed: list[optuna.trial.FrozenTrial] = []
    deadline = time.time() + 600
    try:
        while True:
            assert time.time() < deadline, "the victim never was mid-trial"
            assert victim.poll() is None, victim.stderr.read()[-2000:] if victim.stderr else ""
            time.sleep(0.2)
            if not _mid_trial(storage_url, name, victim.pid):
                continue
            # both frozen: what the storage shows now is what the kill leaves, and the survivor resumes only once
            # the victim's trial is stale (past the heartbeat grace), with trials still to run
            os.kill(victim.pid, signal.SIGSTOP)
            os.kill(survivor.pid, signal.SIGSTOP)
            if _mid_trial(storage_url, name, victim.pid):
                now = _trials(storage_url, name)
                # the survivor counts only pipelines the study had not measured (a repeat is free): it has
                # trials left while fewer of its trials than SURVIVOR_TRIALS proposed something new
                seen: set = set()
                fresh = 0
                for t in sorted(now, key=lambda t: t.number):
                    key = tuple(sorted(t.params.items()))
                    fresh += key not in seen and str(t.user_attrs.get(WORKER_ATTR, "")).endswith(f":{survivor.pid}")
                    seen.add(key)
                assert survivor.poll() is None and fresh < SURVIVOR_TRIALS, \
                    "the survivor finished before the victim was mid-trial"
                before = {t.number: (t.params, t.user_attrs.get("pipeline")) for t in now if t.state in FINISHED}
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait(timeout=60)
                killed = [t for t in _trials(storage_url, name) if t.state == S.RUNNING
                          and str(t.user_attrs.get(WORKER_ATTR, "")).endswith(f":{victim.pid}")]
                time.sleep(3)  # past KVTUNE_HEARTBEAT_GRACE
                os.kill(survivor.pid, signal.SIGCONT)
                break
            os.kill(victim.pid, signal.SIGCONT)
            os.kill(survivor.pid, signal.SIGCONT)
    finally:
        for proc in (victim, survivor):
            if proc.poll() is None and not before:
                proc.kill()
        victim.wait(timeout=60)
    assert len(killed) == 1  # the kill left exactly the victim's trial RUNNING
    out, err = survivor.communicate(timeout=900)
    assert survivor.returncode == 0, err[-3000:]

    trials = _trials(storage_url, name)
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(trials)))  # no duplicate, no gap
    assert not [t.number for t in trials if t.state == S.RUNNING]  # 0 zombies
    after = {t.number: t for t in trials}
    for number, (params, pipeline) in before.items():  # 0 finished trials lost or changed
        assert after[number].state in FINISHED
        assert after[number].params == params and after[number].user_attrs.get("pipeline") == pipeline
    dead = after[killed[0].number]
    assert dead.state == S.FAIL
    # measured again: a later trial runs with the dead trial's parameters fixed (those it had chosen when killed;
    # a trial killed while still sampling its placement gets the placement sampled anew)
    retried = [t for t in trials if t.number > dead.number and t.state == S.COMPLETE
               and (t.system_attrs.get("failed_trial") == dead.number  # PostgreSQL: Optuna's retry callback
                    or t.system_attrs.get("fixed_params") == dead.params)  # journal: kvtune's dead-worker sweep
               and all(t.params.get(k) == v for k, v in dead.params.items())]
    assert dead.params and retried, "the killed candidate was not measured again"
    survivor_pid = survivor.pid
    mine = [t for t in trials if str(t.user_attrs.get(WORKER_ATTR, "")).endswith(f":{survivor_pid}")]
    import json

    summary = json.loads(out)
    # --trials counts pipelines the study had not measured; repeats are free and stop at 3x the trials
    ran = summary["trials_run"]
    assert len(mine) == ran and all(t.state in FINISHED for t in mine)
    assert summary["new_candidates"] == SURVIVOR_TRIALS or (ran == 3 * SURVIVOR_TRIALS
                                                             and summary["new_candidates"] < SURVIVOR_TRIALS)
    finished = [t for t in trials if t.state in FINISHED]
    victim_done = [n for n in before if str(after[n].user_attrs.get(WORKER_ATTR, "")).endswith(f":{victim.pid}")]
    # the creator's, the victim's before the kill, the survivor's (the retried candidate among them)
    assert len(finished) == 1 + len(victim_done) + ran
    for t in finished:  # each trial's stored measurement is the candidate its parameters name
        doc = t.user_attrs.get("pipeline")
        if doc is not None:
            assert doc["codec"]["method"] == t.params["codec"] and doc["placement"]["method"] == t.params["placement"]
    assert summary["measured_in_study"] >= 2 and summary["recommended_now"]


def test_worker_refuses_other_settings_and_unknown_studies(tmp_path):
    url = f"journal:///{tmp_path}/s.log"
    result = runner.invoke(app, ["worker", "--storage", url, "--study", "nope"])
    assert result.exit_code == 2 and "does not exist" in result.stderr and not (tmp_path / "s.log").exists()
    storage = open_storage(url)
    optuna.create_study(study_name="bare", storage=storage)
    result = runner.invoke(app, ["worker", "--storage", url, "--study", "other"])
    assert result.exit_code == 2 and "no such study" in result.stderr and "bare" in result.stderr
    result = runner.invoke(app, ["worker", "--storage", url, "--study", "bare"])
    assert result.exit_code == 2 and "records no settings" in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvtune: error: ")


def test_fingerprint_mismatch_names_the_field():
    own = {"hardware": "h100-sxm", "scenario": "datacenter", "tpot": None}
    assert fingerprint_mismatch(dict(own), own) == ""
    assert fingerprint_mismatch(None, own) == ""
    diff = fingerprint_mismatch({**own, "hardware": "a100-80gb"}, own)
    assert diff == "hardware: study a100-80gb, this worker h100-sxm"


def test_worker_seeds_differ_by_process():
    assert worker_seed(0, "host:1") != worker_seed(0, "host:2")
    assert worker_seed(3, "host:1") == worker_seed(3, "host:1")
    assert 0 <= worker_seed(2**40, "h:9") < 2**31
