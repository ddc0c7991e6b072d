"""The accounts file: scrypt hashes, validation that names entry and field, live reload, the CLI."""

import base64
import hashlib
import io
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workbench.auth import (
    LoginLimiter, LoginLockedOut, User, Users, UsersFileError, add_user, hash_password, load_users, main,
    verify_password,
)

ROOT = Path(__file__).resolve().parent.parent
GOOD = "correct horse"


def write_users(path, entries):
    path.write_text(yaml.safe_dump({"users": entries}, sort_keys=False), encoding="utf-8")


def entry(name="alice", role="expert", level=1, password_hash=None):
    return dict(username=name, password_hash=password_hash or hash_password(GOOD), role=role, level=level)


# ---------------------------------------------------------------------- hashes


def test_hash_round_trip_and_wrong_password():
    stored = hash_password(GOOD)
    assert stored.startswith("scrypt$16384$8$1$")
    assert verify_password(GOOD, stored)
    assert not verify_password("correct horsE", stored)


def test_same_password_hashes_differently():
    a, b = hash_password(GOOD), hash_password(GOOD)
    assert a != b
    assert a.split("$")[4] != b.split("$")[4]  # the salt
    assert verify_password(GOOD, a) and verify_password(GOOD, b)


def test_stored_parameters_are_honoured():
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(GOOD.encode(), salt=salt, n=2**12, r=4, p=2, dklen=24)
    stored = f"scrypt$4096$4$2${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert verify_password(GOOD, stored)
    assert not verify_password(GOOD, stored.replace("$4096$", "$8192$"))


@pytest.mark.parametrize("stored", [
    "", "plain text", "scrypt$16384$8$1$onlyfive", "bcrypt$16384$8$1$c2FsdA==$aGFzaA==",
    "scrypt$x$8$1$c2FsdA==$aGFzaA==", "scrypt$16384$8$1$not base64!$aGFzaA==",
    "scrypt$3$8$1$c2FsdA==$aGFzaA==", None,
])
def test_malformed_hash_is_no_match(stored):
    assert verify_password(GOOD, stored) is False


def test_short_password_refused():
    with pytest.raises(ValueError, match="at least 8 characters"):
        hash_password("short")


# ---------------------------------------------------------------------- add_user


def test_add_user_creates_private_file_and_keeps_others(tmp_path):
    path = tmp_path / "users.yaml"
    alice = add_user(path, "alice", GOOD, role="admin", level=3)
    assert alice == User("alice", "admin", 3, alice.password_hash) and alice.is_admin
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    add_user(path, "bob", "another secret")
    users = load_users(path)
    assert [(u.name, u.role, u.level) for u in users] == [("alice", "admin", 3), ("bob", "expert", 1)]
    assert users[0].password_hash == alice.password_hash
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["users.yaml"]  # no temp file left behind


def test_add_user_refuses_duplicate_unless_replace(tmp_path):
    path = tmp_path / "users.yaml"
    add_user(path, "alice", GOOD)
    add_user(path, "bob", "bob's secret")
    with pytest.raises(UsersFileError, match="already exists.*--replace"):
        add_user(path, "alice", "new password")
    add_user(path, "alice", "new password", role="admin", level=2, replace=True)
    users = Users(path)
    assert [u.name for u in users.all()] == ["alice", "bob"]
    assert users.get("alice").level == 2 and users.get("alice").is_admin
    assert users.authenticate("alice", "new password") and not users.authenticate("alice", GOOD)


def test_add_user_validates_before_writing(tmp_path):
    path = tmp_path / "users.yaml"
    with pytest.raises(UsersFileError, match="role must be expert or admin"):
        add_user(path, "alice", GOOD, role="root")
    with pytest.raises(UsersFileError, match="username must be"):
        add_user(path, "-alice", GOOD)
    assert not path.exists()


# ---------------------------------------------------------------------- the file


@pytest.mark.parametrize("entries, message", [
    ([entry("alice"), entry("bob", level=5)], r"user 2 \('bob'\): level must be 1, 2 or 3, not 5"),
    ([entry("alice", role="root")], r"user 1 \('alice'\): role must be expert or admin, not 'root'"),
    ([entry("alice"), entry("alice")], r"user 2 \('alice'\): username is already used"),
    ([{"username": "carol", "role": "expert", "level": 1}], r"user 1 \('carol'\): missing password_hash"),
    ([entry("alice", password_hash="hunter2hunter2")], r"user 1 \('alice'\): password_hash is not a scrypt"),
    ([dict(entry("alice"), leve=2)], r"user 1 \('alice'\): unknown field\(s\) leve"),
    ([entry("a b")], r"user 1: username must be"),
    (["alice"], r"user 1: must be a mapping"),
])
def test_invalid_file_names_entry_and_field(tmp_path, entries, message):
    path = tmp_path / "users.yaml"
    write_users(path, entries)
    with pytest.raises(UsersFileError, match=message) as info:
        Users(path)
    assert str(info.value).startswith(f"{path}: ")


def test_users_not_a_list(tmp_path):
    path = tmp_path / "users.yaml"
    path.write_text("users:\n  alice: secret\n", encoding="utf-8")
    with pytest.raises(UsersFileError, match="'users' must be a list"):
        Users(path)


def test_missing_file_says_how_to_create_one(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UsersFileError) as info:
        Users(path)
    assert str(path) in str(info.value)
    assert f"python -m workbench.auth add-user --users {path} --name NAME --role admin" in str(info.value)


def test_users_reload_picks_up_new_user_and_keeps_last_good(tmp_path, caplog):
    path = tmp_path / "users.yaml"
    add_user(path, "alice", GOOD, role="admin", level=3)
    users = Users(path)
    assert users.authenticate("alice", GOOD)
    assert not users.authenticate("alice", "wrong password")
    assert not users.authenticate("bob", "bob's secret") and users.get("bob") is None

    add_user(path, "bob", "bob's secret", level=2)
    assert users.authenticate("bob", "bob's secret")
    assert users.get("bob") == User("bob", "expert", 2, users.get("bob").password_hash)

    path.write_text("users: [this is: broken\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="workbench.auth"):
        assert users.authenticate("alice", GOOD) and users.authenticate("bob", "bob's secret")
    assert "keeping the last good accounts" in caplog.text and str(path) in caplog.text
    assert [u.name for u in users.all()] == ["alice", "bob"]


# ---------------------------------------------------------------------- failed logins


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def limited(tmp_path):
    """alice and bob, with a limiter on a hand-moved clock: 5 failures in 300 s lock out for 30 s."""
    path = tmp_path / "users.yaml"
    write_users(path, [entry("alice"), entry("bob")])
    clock = Clock()
    return Users(path, LoginLimiter(failures=5, window=300, lockout=30, clock=clock)), clock


def test_five_failed_logins_lock_the_name_out_for_30_seconds(limited):
    users, clock = limited
    for k in range(4):
        assert not users.authenticate("alice", "guess %d" % k, address="10.0.0.1")
    assert users.authenticate("alice", GOOD, address="10.0.0.9")  # 4 failures: not yet; a success clears them
    for k in range(5):
        assert not users.authenticate("alice", "guess %d" % k, address="10.0.0.%d" % k)  # five addresses, one name
    with pytest.raises(LoginLockedOut, match="too many failed logins for user 'alice': try again in 30 s"):
        users.authenticate("alice", GOOD, address="10.0.0.9")  # the right password too, from anywhere
    clock.now += 29.5
    with pytest.raises(LoginLockedOut, match="try again in 1 s") as info:
        users.authenticate("alice", GOOD)
    assert info.value.retry_after == pytest.approx(0.5)
    assert users.authenticate("bob", GOOD, address="10.0.0.9")  # other names are not affected
    clock.now += 0.5
    assert users.authenticate("alice", GOOD, address="10.0.0.9")


def test_five_failed_logins_from_one_address_lock_that_address_out(limited):
    users, clock = limited
    for name in ["alice", "bob", "carol", "dave", "erin"]:  # five names, one failure each: a sweep
        assert not users.authenticate(name, "guess", address="203.0.113.7")
    with pytest.raises(LoginLockedOut, match="too many failed logins for address 203.0.113.7"):
        users.authenticate("bob", GOOD, address="203.0.113.7")
    assert users.authenticate("bob", GOOD, address="198.51.100.1")  # bob from elsewhere is fine
    clock.now += 30
    assert users.authenticate("bob", GOOD, address="203.0.113.7")


def test_failures_older_than_the_window_are_forgotten(limited):
    users, clock = limited
    for _ in range(4):
        assert not users.authenticate("alice", "guess")
    clock.now += 301  # the window has passed: the next failure counts as the first
    for _ in range(4):
        assert not users.authenticate("alice", "guess")
    assert users.authenticate("alice", GOOD)


# ---------------------------------------------------------------------- command line


def cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "workbench.auth", *args], input=stdin, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_add_user_and_list(tmp_path):
    path = tmp_path / "users.yaml"
    done = cli("add-user", "--users", str(path), "--name", "alice", "--role", "admin", "--level", "3",
               "--password-stdin", stdin=GOOD + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"added alice (admin, level 3) to {path}\n"
    assert Users(path).authenticate("alice", GOOD)
    add_user(path, "bob", "bob's secret", level=2)

    listed = cli("list", "--users", str(path))
    assert listed.returncode == 0, listed.stderr
    assert [line.split() for line in listed.stdout.splitlines()] == [
        ["alice", "admin", "level", "3"], ["bob", "expert", "level", "2"]]
    assert "scrypt" not in listed.stdout


def test_cli_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    # In-process: another interpreter would spend seconds importing the workbench package.
    path = tmp_path / "users.yaml"
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["add-user", "--users", str(path), "--name", "alice", "--password-stdin"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["error: password must be at least 8 characters"]
    assert not path.exists()


def test_cli_refuses_mismatched_passwords(tmp_path, monkeypatch, capsys):
    path = tmp_path / "users.yaml"
    answers = iter([GOOD, GOOD + "!"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert main(["add-user", "--users", str(path), "--name", "alice"]) == 2
    assert capsys.readouterr().err == "error: the two passwords do not match\n"
    assert not path.exists()
