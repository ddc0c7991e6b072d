"""The experts' accounts: the file behind ``python app.py --auth users.yaml``.

    python -m workbench.auth add-user --users users.yaml --name alice --role admin --level 3
    python -m workbench.auth list --users users.yaml

Passwords are hashed with the standard library's scrypt, so there is no extra dependency
and the file never holds a plain-text password. ``Users`` re-reads the file when it changes,
so an admin can add an expert without restarting the server; a broken edit is logged and
the last good accounts stay in force, so a typo cannot lock everyone out.

Failed logins are limited per user name and per client address (``LoginLimiter``): after 5
failures within 5 minutes that name, or that address, is refused for 30 s, before any hash is
computed, so password guessing is slow and cannot keep the server busy hashing.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import logging
import math
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from data.experts import LEVELS, ROLES
from data.files import write_atomically

log = logging.getLogger(__name__)

MIN_PASSWORD = 8
_N, _R, _P, _DKLEN = 2**14, 8, 1, 32
_MAXMEM = 128 * 1024 * 1024  # room for stored hashes made with larger n or r than ours
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FIELDS = ("username", "password_hash", "role", "level")
LOGIN_FAILURES = 5  # failed logins, per user name or per client address, before a lockout
FAILURE_WINDOW_SECONDS = 300.0  # failures older than this are forgotten
LOCKOUT_SECONDS = 30.0


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64): the parameters travel with the hash, so they can change later."""
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"password must be at least {MIN_PASSWORD} characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    salt64, digest64 = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"scrypt${_N}${_R}${_P}${salt64}${digest64}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != "scrypt":
        raise ValueError(f"unknown scheme {scheme!r}")
    return int(n), int(r), int(p), base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches; a malformed ``stored`` is simply no match, never an exception."""
    try:
        n, r, p, salt, digest = _parse_hash(stored)
        candidate = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(digest))
    except (ValueError, TypeError, AttributeError, OverflowError, MemoryError):
        return False
    return hmac.compare_digest(candidate, digest)


@cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_hex(16))


@dataclass(frozen=True)
class User:
    name: str
    role: str
    level: int
    password_hash: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class UsersFileError(ValueError):
    """A bad accounts file; the message names the file, the entry and the field."""


def _check_user(where: str, entry) -> User:
    if not isinstance(entry, dict):
        raise UsersFileError(f"{where}: must be a mapping with {', '.join(_FIELDS)}, not {entry!r}")
    name = entry.get("username")
    if isinstance(name, str) and _NAME.fullmatch(name):
        where = f"{where} ({name!r})"
    unknown = sorted(map(str, set(entry) - set(_FIELDS)))
    if unknown:
        raise UsersFileError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(_FIELDS)}")
    missing = [field for field in _FIELDS if field not in entry]
    if missing:
        raise UsersFileError(f"{where}: missing {', '.join(missing)}")
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise UsersFileError(f"{where}: username must be letters, digits, '_', '.' or '-' "
                             f"(1-64, starting with a letter or digit), not {name!r}")
    if entry["role"] not in ROLES:
        raise UsersFileError(f"{where}: role must be expert or admin, not {entry['role']!r}")
    level = entry["level"]
    if isinstance(level, bool) or level not in LEVELS:
        raise UsersFileError(f"{where}: level must be 1, 2 or 3, not {level!r}")
    stored = entry["password_hash"]
    try:
        _parse_hash(stored)
    except (ValueError, TypeError, AttributeError):
        raise UsersFileError(f"{where}: password_hash is not a scrypt$... hash from "
                             "`python -m workbench.auth add-user`") from None
    return User(name, entry["role"], level, stored)


def load_users(path) -> list[User]:
    """Read and validate the whole file; any problem is one ``UsersFileError``."""
    path = Path(path)
    if not path.exists():
        raise UsersFileError(f"{path}: no such accounts file; create one with "
                             f"`python -m workbench.auth add-user --users {path} --name NAME --role admin`")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsersFileError(f"{path}: cannot read: {exc}") from None
    entries = data.get("users") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise UsersFileError(f"{path}: 'users' must be a list of accounts (username, password_hash, role, level)")
    users: dict[str, User] = {}
    for i, entry in enumerate(entries, 1):
        user = _check_user(f"{path}: user {i}", entry)
        if user.name in users:
            raise UsersFileError(f"{path}: user {i} ({user.name!r}): username is already used by an earlier entry")
        users[user.name] = user
    return list(users.values())


class LoginLockedOut(PermissionError):
    """Too many failed logins for a user name or from an address; the message says which and for how long."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class LoginLimiter:
    """Counts failed logins per user name and per client address; ``failures`` of them within
    ``window`` seconds lock that name or address out for ``lockout`` seconds, right password or not.
    A success clears the counts of its name and address. ``clock`` is injectable for tests."""

    def __init__(self, failures: int = LOGIN_FAILURES, window: float = FAILURE_WINDOW_SECONDS,
                 lockout: float = LOCKOUT_SECONDS, clock=time.monotonic):
        self.failures, self.window, self.lockout, self.clock = failures, window, lockout, clock
        self._lock = threading.Lock()
        self._failed: dict[str, tuple[int, float]] = {}  # key -> (failures, time of the first in the window)
        self._locked_until: dict[str, float] = {}

    @staticmethod
    def _keys(username: str, address: str | None) -> dict[str, str]:
        """The counters a login attempt touches, with how a message names them."""
        name = (username or "")[:100]  # a megabyte of name is not a megabyte of memory
        keys = {f"user\0{name}": f"user {name!r}"}
        if address:
            keys[f"address\0{address}"] = f"address {address}"
        return keys

    def check(self, username: str, address: str | None = None) -> None:
        """Raise ``LoginLockedOut`` while the name or the address is locked out."""
        now = self.clock()
        with self._lock:
            for key, what in self._keys(username, address).items():
                until = self._locked_until.get(key)
                if until is not None and now < until:
                    wait = math.ceil(until - now)
                    raise LoginLockedOut(f"too many failed logins for {what}: try again in {wait} s", until - now)
                self._locked_until.pop(key, None)

    def failed(self, username: str, address: str | None = None) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failed) > 100_000:  # a flood of names: forget counts whose window has passed
                self._failed = {k: v for k, v in self._failed.items() if now - v[1] <= self.window}
            for key in self._keys(username, address):
                count, first = self._failed.get(key, (0, now))
                count, first = (1, now) if now - first > self.window else (count + 1, first)
                if count >= self.failures:
                    self._locked_until[key] = now + self.lockout
                    self._failed.pop(key, None)
                else:
                    self._failed[key] = (count, first)

    def succeeded(self, username: str, address: str | None = None) -> None:
        with self._lock:
            for key in self._keys(username, address):
                self._failed.pop(key, None)


def _stamp(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Users:
    """The accounts in force. Loads at construction, so a bad file fails at startup."""

    def __init__(self, path, limiter: LoginLimiter | None = None):
        self.path = Path(path)
        self.limiter = limiter or LoginLimiter()
        self._lock = threading.Lock()
        self._stamp = _stamp(self.path)
        self._users = {u.name: u for u in load_users(self.path)}

    def _refresh(self) -> None:
        """Re-read when mtime or size changed; a bad file is logged once and the last good accounts kept."""
        with self._lock:
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self._users = {u.name: u for u in load_users(self.path)}
            except UsersFileError as exc:
                log.warning("keeping the last good accounts: %s", exc)

    def authenticate(self, username: str, password: str, address: str | None = None) -> bool:
        """True for a known name with its password. Raises ``LoginLockedOut`` while the name or the
        client ``address`` is locked out by failed logins (checked before any hashing)."""
        self.limiter.check(username, address)
        user = self.get(username)
        # An unknown name costs a hash too, so timing does not tell which names exist.
        good = verify_password(password, user.password_hash if user else _dummy_hash()) and user is not None
        (self.limiter.succeeded if good else self.limiter.failed)(username, address)
        return good

    def get(self, username: str) -> User | None:
        self._refresh()
        return self._users.get(username)

    def all(self) -> list[User]:
        self._refresh()
        return list(self._users.values())


def add_user(path, name: str, password: str, role: str = "expert", level: int = 1, replace: bool = False) -> User:
    """Add (or with ``replace`` overwrite) one account; the file is rewritten atomically, mode 0o600."""
    path = Path(path)
    user = _check_user(f"{path}: new user", dict(username=name, password_hash=hash_password(password),
                                                  role=role, level=level))
    users = load_users(path) if path.exists() else []  # a missing file starts as `users: []`
    exists = any(u.name == name for u in users)
    if exists and not replace:
        raise UsersFileError(f"{path}: user {name!r} already exists; pass --replace to overwrite it")
    users = [user if u.name == name else u for u in users] if exists else users + [user]
    text = yaml.safe_dump({"users": [dict(username=u.name, password_hash=u.password_hash, role=u.role, level=u.level)
                                     for u in users]}, sort_keys=False)
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))  # mode 0o600
    return user


# ---------------------------------------------------------------------- command line


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("password: ")
    if getpass.getpass("again: ") != password:
        raise ValueError("the two passwords do not match")
    return password


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.auth", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add-user", help="add an account (asks for the password)")
    add.add_argument("--users", required=True, help="accounts file, created if missing")
    add.add_argument("--name", required=True)
    add.add_argument("--role", default="expert", choices=ROLES)
    add.add_argument("--level", default=1, type=int, choices=LEVELS, help="weights the expert's votes")
    add.add_argument("--replace", action="store_true", help="overwrite an existing account")
    add.add_argument("--password-stdin", action="store_true", help="read one line from stdin instead of asking")
    show = commands.add_parser("list", help="names, roles and levels (never hashes)")
    show.add_argument("--users", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "add-user":
            user = add_user(args.users, args.name, _read_password(args.password_stdin),
                            args.role, args.level, args.replace)
            print(f"added {user.name} ({user.role}, level {user.level}) to {args.users}")
        else:
            for user in load_users(args.users):
                print(f"{user.name}\t{user.role}\tlevel {user.level}")
    except (ValueError, OSError, EOFError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
