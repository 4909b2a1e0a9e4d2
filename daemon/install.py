"""`infinitetalk install-systemd`: set a machine up to run the daemon and the dashboard as services.

What it does, in order (each step is skipped when already done, so running it again is safe):

1. groups `infinitetalk` (the daemon; the dashboard reads the ledger through it) and
   `infinitetalk-upload` (people and accounts allowed to drop jobs over SFTP/rsync);
2. system users `infinitetalk` (the daemon) and `infinitetalk-web` (the dashboard), no login shell;
3. the folders, with owners and modes:
   - `/srv/infinitetalk`            root:root 0755 (an SFTP `ChrootDirectory` may point here)
   - `/srv/infinitetalk/inbox`      infinitetalk:infinitetalk-upload 2775 (uploaders write; setgid
     keeps every upload in the upload group, which the daemon reads)
   - `/srv/infinitetalk/inbox/.control` infinitetalk:infinitetalk-upload 2770 (uploaders' cancel
     requests: `infinitetalk cancel --inbox`; the daemon answers there)
   - `/srv/infinitetalk/outbox`     infinitetalk:infinitetalk-upload 2750 (uploaders and the
     dashboard read results)
   - `/srv/infinitetalk/weights`    root:infinitetalk 2750 (the released weights, read-only to the
     daemon)
   - `/var/lib/infinitetalk`        infinitetalk:infinitetalk 0750 (state: ledger, claimed inputs)
   - `/etc/infinitetalk`            root:infinitetalk 0750, with `infinitetalk.toml` 0640 (kept if
     it already exists)
4. the two units from `systemd/`, with the paths, users and groups substituted, into
   `/etc/systemd/system`, then `systemctl daemon-reload`;
5. prints how to start them.

`--ray-worker HOST:PORT` (a GPU host of a Ray cluster, docs/scaling.md) installs instead only the
daemon's group and user, the weights folder and `infinitetalk-ray-worker.service`, which runs the
venv's `ray start --address=HOST:PORT --block` (docs/systemd.md).

`--dry-run` prints the steps as commands and changes nothing. `--root DIR` installs into a fake
root (for tests and image builds): users are written to `DIR/etc/passwd` with `useradd --prefix`,
owners are set only when running as root, and `systemctl` is not called.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PREFIX = Path("/opt/infinitetalk")
DEFAULT_CONFIG = Path("/etc/infinitetalk/infinitetalk.toml")
DEFAULT_DATA_DIR = Path("/srv/infinitetalk")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
#: fixed by the units' StateDirectory=infinitetalk
STATE_DIR = Path("/var/lib/infinitetalk")
DEFAULT_USER = "infinitetalk"
DEFAULT_WEB_USER = "infinitetalk-web"
DEFAULT_UPLOAD_GROUP = "infinitetalk-upload"
UNIT_NAMES = ("infinitetalk.service", "infinitetalk-dashboard.service")
#: the one unit of `--ray-worker` (a GPU host of a Ray cluster, docs/scaling.md)
RAY_WORKER_UNIT = "infinitetalk-ray-worker.service"
#: `ray start --address=` of a worker: the head's GCS as host:port (IPv6 in brackets)
RAY_ADDRESS_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?):[0-9]{1,5}")
#: where the shipped units live: `systemd/` next to the `daemon` package
UNIT_SOURCE_DIR = Path(__file__).resolve().parent.parent / "systemd"
#: places a service with ProtectHome=yes cannot see
HIDDEN_BY_PROTECT_HOME = (Path("/home"), Path("/root"), Path("/run/user"))
NAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class InstallError(Exception):
    """A bad option or a failed step; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallOptions:
    """What to install where; the paths are as the installed system sees them (no `root`)."""

    prefix: Path = DEFAULT_PREFIX
    config: Path = DEFAULT_CONFIG
    data_dir: Path = DEFAULT_DATA_DIR
    unit_dir: Path = DEFAULT_UNIT_DIR
    user: str = DEFAULT_USER
    web_user: str = DEFAULT_WEB_USER
    upload_group: str = DEFAULT_UPLOAD_GROUP
    root: Path = Path("/")
    dry_run: bool = False
    #: install only the Ray worker unit, joining the head at this host:port (None: the daemon's)
    ray_worker: str | None = None

    def __post_init__(self) -> None:
        if self.ray_worker is not None:
            address = self.ray_worker
            port = int(address.rpartition(":")[2]) if RAY_ADDRESS_RE.fullmatch(address) else 0
            if not 0 < port < 65536:
                raise InstallError(
                    f"--ray-worker must be the head's address as HOST:PORT (the port of `ray start "
                    f"--head`, 6379 by default), e.g. gpu-head:6379, got {address!r}"
                )
        for name in ("prefix", "config", "data_dir", "unit_dir"):
            path = getattr(self, name)
            if not path.is_absolute() or any(ch.isspace() for ch in str(path)):
                raise InstallError(
                    f"--{name.replace('_', '-')} must be an absolute path without spaces, got {str(path)!r}"
                )
        for name in ("user", "web_user", "upload_group"):
            value = getattr(self, name)
            if not NAME_RE.fullmatch(value):
                raise InstallError(
                    f"--{name.replace('_', '-')} must be a valid user/group name "
                    f"(lower case, digits, - and _), got {value!r}"
                )
        if len({self.user, self.web_user, self.upload_group}) != 3:
            raise InstallError(
                f"--user, --web-user and --upload-group must differ, got "
                f"{self.user!r}, {self.web_user!r}, {self.upload_group!r}"
            )
        for hidden in HIDDEN_BY_PROTECT_HOME:
            for name in ("prefix", "data_dir"):
                if getattr(self, name).is_relative_to(hidden):
                    raise InstallError(
                        f"--{name.replace('_', '-')} {getattr(self, name)} is under {hidden}, "
                        f"which the services cannot see (ProtectHome=yes); use e.g. "
                        f"{DEFAULT_PREFIX} or {DEFAULT_DATA_DIR}"
                    )

    @property
    def executable(self) -> Path:
        """What the units run: the venv's `ray` for a Ray worker, else its `infinitetalk`."""
        return self.prefix / ".venv" / "bin" / ("ray" if self.ray_worker else "infinitetalk")

    @property
    def unit_names(self) -> tuple[str, ...]:
        return (RAY_WORKER_UNIT,) if self.ray_worker else UNIT_NAMES

    @property
    def inbox(self) -> Path:
        return self.data_dir / "inbox"

    @property
    def outbox(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def weights(self) -> Path:
        return self.data_dir / "weights"

    def on_disk(self, path: Path) -> Path:
        """Where `path` of the installed system lies on this machine (inside `root`)."""
        return self.root / path.relative_to("/")


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True, kw_only=True)
class EnsureGroup:
    name: str

    def describe(self) -> str:
        return f"groupadd --system {self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class EnsureUser:
    name: str
    group: str
    extra_groups: tuple[str, ...]
    home: Path
    comment: str

    def describe(self) -> str:
        extra = f" --groups {','.join(self.extra_groups)}" if self.extra_groups else ""
        return (
            f"useradd --system --gid {self.group}{extra} --home-dir {self.home} --no-create-home "
            f"--shell /usr/sbin/nologin --comment '{self.comment}' {self.name}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EnsureDir:
    path: Path
    owner: str
    group: str
    mode: int

    def describe(self) -> str:
        return f"install -d -o {self.owner} -g {self.group} -m {self.mode:04o} {self.path}"


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteFile:
    path: Path
    text: str
    owner: str
    group: str
    mode: int
    keep_existing: bool = False

    def describe(self) -> str:
        keep = " (kept if it exists)" if self.keep_existing else ""
        return f"write {self.path} ({self.mode:04o} {self.owner}:{self.group}){keep}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCommand:
    argv: tuple[str, ...]

    def describe(self) -> str:
        return " ".join(self.argv)


Action = EnsureGroup | EnsureUser | EnsureDir | WriteFile | RunCommand


# ---------------------------------------------------------------- units and config


def _map_tokens(value: str, mapping: dict[str, str]) -> str:
    return " ".join(mapping.get(token, token) for token in value.split(" "))


def render_unit(text: str, opts: InstallOptions) -> str:
    """The shipped unit with `opts`' paths, users and groups in place of the defaults."""
    names = {
        DEFAULT_USER: opts.user,
        DEFAULT_WEB_USER: opts.web_user,
        DEFAULT_UPLOAD_GROUP: opts.upload_group,
    }
    paths = {
        str(DEFAULT_DATA_DIR / "inbox"): str(opts.inbox),
        str(DEFAULT_DATA_DIR / "outbox"): str(opts.outbox),
        str(DEFAULT_DATA_DIR / "weights"): str(opts.weights),
    }
    out = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            out.append(line)
            continue
        if key == "ExecStart":
            value = value.replace(str(DEFAULT_PREFIX / ".venv"), str(opts.prefix / ".venv"), 1)
            value = value.replace(f"--config {DEFAULT_CONFIG}", f"--config {opts.config}", 1)
            if opts.ray_worker:
                value = re.sub(r"--address=\S+", f"--address={opts.ray_worker}", value, count=1)
        elif key in ("User", "Group", "SupplementaryGroups"):
            value = _map_tokens(value, names)
        elif key in ("ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths"):
            value = _map_tokens(value, paths)
        out.append(f"{key}={value}")
    return "\n".join(out) + "\n"


def render_config(opts: InstallOptions) -> str:
    """A complete, documented config file pointing at the installed folders."""
    from daemon.config import Settings, render_toml

    settings = dataclasses.replace(
        Settings(), inbox=opts.inbox, outbox=opts.outbox, state_dir=STATE_DIR, weights_dir=opts.weights
    )
    header = (
        "# Written by `infinitetalk install-systemd`; edit freely, it is never overwritten.\n"
        "# `sudo systemctl reload infinitetalk` applies caps, timings and [defaults];\n"
        "# paths and model settings need `sudo systemctl restart infinitetalk`.\n"
    )
    return header + render_toml(settings)


def plan_ray_worker(opts: InstallOptions, unit_texts: dict[str, str]) -> list[Action]:
    """A GPU host of a Ray cluster: the daemon's user (the actors read the weights through its
    group), the weights folder at the head's path, the worker unit. No inbox, outbox, state or
    config: those stay on the head."""
    group = opts.user
    return [
        EnsureGroup(name=group),
        EnsureUser(
            name=opts.user,
            group=group,
            extra_groups=(),
            home=Path("/var/lib/infinitetalk-ray"),
            comment="InfiniteTalk render daemon",
        ),
        EnsureDir(path=opts.data_dir, owner="root", group="root", mode=0o755),
        EnsureDir(path=opts.weights, owner="root", group=group, mode=0o2750),
        WriteFile(
            path=opts.unit_dir / RAY_WORKER_UNIT,
            text=render_unit(unit_texts[RAY_WORKER_UNIT], opts),
            owner="root",
            group="root",
            mode=0o644,
        ),
        RunCommand(argv=("systemctl", "daemon-reload")),
    ]


def plan(opts: InstallOptions, unit_texts: dict[str, str]) -> list[Action]:
    """Every step of the installation, in order."""
    if opts.ray_worker:
        return plan_ray_worker(opts, unit_texts)
    user, group, upload = opts.user, opts.user, opts.upload_group
    actions: list[Action] = [
        EnsureGroup(name=group),
        EnsureGroup(name=upload),
        EnsureUser(
            name=user,
            group=group,
            extra_groups=(upload,),
            home=STATE_DIR,
            comment="InfiniteTalk render daemon",
        ),
        EnsureUser(
            name=opts.web_user,
            group=group,
            extra_groups=(upload,),
            home=Path("/nonexistent"),
            comment="InfiniteTalk dashboard",
        ),
        EnsureDir(path=opts.data_dir, owner="root", group="root", mode=0o755),
        EnsureDir(path=opts.inbox, owner=user, group=upload, mode=0o2775),
        # cancel requests of upload-group users (daemon/control.py, `infinitetalk cancel --inbox`)
        EnsureDir(path=opts.inbox / ".control", owner=user, group=upload, mode=0o2770),
        EnsureDir(path=opts.outbox, owner=user, group=upload, mode=0o2750),
        EnsureDir(path=opts.weights, owner="root", group=group, mode=0o2750),
        EnsureDir(path=STATE_DIR, owner=user, group=group, mode=0o750),
        EnsureDir(path=opts.config.parent, owner="root", group=group, mode=0o750),
        WriteFile(
            path=opts.config,
            text=render_config(opts),
            owner="root",
            group=group,
            mode=0o640,
            keep_existing=True,
        ),
    ]
    for name in UNIT_NAMES:
        actions.append(
            WriteFile(
                path=opts.unit_dir / name,
                text=render_unit(unit_texts[name], opts),
                owner="root",
                group="root",
                mode=0o644,
            )
        )
    actions.append(RunCommand(argv=("systemctl", "daemon-reload")))
    return actions


# ---------------------------------------------------------------- carrying it out


def _read_db(path: Path) -> dict[str, tuple[str, ...]]:
    """name -> fields of a passwd/group style file ({} if it does not exist)."""
    if not path.is_file():
        return {}
    rows = (line.split(":") for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {row[0]: tuple(row) for row in rows}


class Installer:
    """Applies actions to `opts.root`, printing one line per step to `out`."""

    def __init__(self, opts: InstallOptions, out: object = sys.stdout) -> None:
        self.opts = opts
        self.out = out
        self.fake_root = opts.root.resolve() != Path("/")
        self.privileged = os.geteuid() == 0

    def say(self, line: str) -> None:
        print(line, file=self.out)  # type: ignore[call-overload]

    def _shadow_args(self) -> list[str]:
        return ["--prefix", str(self.opts.root.resolve())] if self.fake_root else []

    def _groups(self) -> dict[str, tuple[str, ...]]:
        """name -> (name, password, gid, members) of the target system."""
        if self.fake_root:
            return _read_db(self.opts.on_disk(Path("/etc/group")))
        import grp

        return {g.gr_name: (g.gr_name, "x", str(g.gr_gid), ",".join(g.gr_mem)) for g in grp.getgrall()}

    def _users(self) -> dict[str, tuple[str, ...]]:
        """name -> (name, password, uid, gid, ...) of the target system."""
        if self.fake_root:
            return _read_db(self.opts.on_disk(Path("/etc/passwd")))
        import pwd

        return {p.pw_name: (p.pw_name, "x", str(p.pw_uid), str(p.pw_gid)) for p in pwd.getpwall()}

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(argv, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise InstallError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")

    def _can_manage_accounts(self) -> bool:
        if self.privileged:
            return True
        self.say("  skipped: creating users and groups needs root")
        return False

    def _prepare_fake_etc(self) -> None:
        etc = self.opts.on_disk(Path("/etc"))
        etc.mkdir(parents=True, exist_ok=True)
        for name in ("passwd", "group", "shadow", "gshadow"):
            (etc / name).touch(exist_ok=True)

    def apply(self, action: Action) -> None:
        self.say(("would: " if self.opts.dry_run else "") + action.describe())
        if self.opts.dry_run:
            return
        if isinstance(action, EnsureGroup):
            self._ensure_group(action)
        elif isinstance(action, EnsureUser):
            self._ensure_user(action)
        elif isinstance(action, EnsureDir):
            self._ensure_dir(action)
        elif isinstance(action, WriteFile):
            self._write_file(action)
        else:
            self._run_command(action)

    def _ensure_group(self, action: EnsureGroup) -> None:
        if self.fake_root:
            self._prepare_fake_etc()
        if action.name in self._groups():
            self.say(f"  group {action.name} exists")
        elif self._can_manage_accounts():
            self._run(["groupadd", *self._shadow_args(), "--system", action.name])

    def _ensure_user(self, action: EnsureUser) -> None:
        users = self._users()
        if action.name not in users:
            if not self._can_manage_accounts():
                return
            self._run(
                [
                    "useradd",
                    *self._shadow_args(),
                    "--system",
                    "--gid",
                    action.group,
                    *(("--groups", ",".join(action.extra_groups)) if action.extra_groups else ()),
                    "--home-dir",
                    str(action.home),
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    action.comment,
                    action.name,
                ]
            )
            return
        self.say(f"  user {action.name} exists")
        groups = self._groups()
        for extra in action.extra_groups:
            members = groups.get(extra, ("", "", "", ""))[3].split(",")
            if action.name not in members and self._can_manage_accounts():
                self._run(["usermod", *self._shadow_args(), "--append", "--groups", extra, action.name])

    def _ids(self, owner: str, group: str) -> tuple[int, int] | None:
        """uid and gid in the target system, or None when owners cannot be set (not root)."""
        if not self.privileged:
            return None
        users, groups = self._users(), self._groups()
        try:
            uid = 0 if owner == "root" else int(users[owner][2])
            gid = 0 if group == "root" else int(groups[group][2])
        except (KeyError, IndexError, ValueError) as e:
            raise InstallError(
                f"cannot set owner {owner}:{group}: not in {self.opts.on_disk(Path('/etc'))}"
            ) from e
        return uid, gid

    def _set_owner_mode(self, path: Path, owner: str, group: str, mode: int) -> None:
        ids = self._ids(owner, group)
        if ids is not None:
            os.chown(path, *ids)
        os.chmod(path, mode)  # after chown, which clears setgid bits

    def _ensure_dir(self, action: EnsureDir) -> None:
        path = self.opts.on_disk(action.path)
        path.mkdir(parents=True, exist_ok=True)
        self._set_owner_mode(path, action.owner, action.group, action.mode)

    def _write_file(self, action: WriteFile) -> None:
        path = self.opts.on_disk(action.path)
        if action.keep_existing and path.exists():
            self.say(f"  kept the existing {action.path}")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(action.text, encoding="utf-8")
        self._set_owner_mode(tmp, action.owner, action.group, action.mode)
        os.replace(tmp, path)

    def _run_command(self, action: RunCommand) -> None:
        if self.fake_root:
            self.say("  skipped: --root given")
            return
        if shutil.which(action.argv[0]) is None or not Path("/run/systemd/system").is_dir():
            self.say("  skipped: systemd is not running on this machine")
            return
        self._run(list(action.argv))


def _check_executable(opts: InstallOptions) -> str | None:
    """None when the units' ExecStart exists, else a message saying how to provide it."""
    exe = opts.on_disk(opts.executable)
    if os.access(exe, os.X_OK):
        return None
    extra = " with the ray extra (pip install '.[ray]')" if opts.ray_worker else ""
    return (
        f"{opts.executable} does not exist: the units run the project from {opts.prefix}. Install it "
        f"there first{extra} (git clone <this project> {opts.prefix} && {opts.prefix}/scripts/bootstrap), "
        f"or pass --prefix DIR where DIR/.venv/bin/{opts.executable.name} exists"
    )


def load_unit_texts(source: Path = UNIT_SOURCE_DIR, names: tuple[str, ...] = UNIT_NAMES) -> dict[str, str]:
    texts = {}
    for name in names:
        path = source / name
        if not path.is_file():
            raise InstallError(f"unit {path} not found: run install-systemd from a checkout of the project")
        texts[name] = path.read_text(encoding="utf-8")
    return texts


def next_steps_ray_worker(opts: InstallOptions) -> str:
    return "\n".join(
        [
            "",
            "Next:",
            f"  1. put the weights in {opts.weights}, the same files at the same path as the head's",
            "     weights_dir (the actors on this host load them from there), e.g.:",
            f"       sudo rsync -a HEAD:{opts.weights}/ {opts.weights}/",
            "  2. start the worker, now and at every boot (it joins the head at "
            f"{opts.ray_worker}, and again whenever it lost it):",
            "       sudo systemctl enable --now infinitetalk-ray-worker",
            "  3. watch it:",
            "       journalctl -u infinitetalk-ray-worker -f",
            f"       on the head: {opts.prefix}/.venv/bin/ray status   (this host's GPUs are listed)",
            "       on the head: infinitetalk status   (a worker line per actor, with its node)",
        ]
    )


def next_steps(opts: InstallOptions) -> str:
    from daemon.config import ConfigError, load_settings

    if opts.ray_worker:
        return next_steps_ray_worker(opts)
    host, port = "127.0.0.1", 8000
    config = opts.on_disk(opts.config)
    if config.is_file():
        try:
            dash = load_settings(config).dashboard
            host, port = dash.host, dash.port
        except ConfigError:
            pass
    exe = opts.executable
    return "\n".join(
        [
            "",
            "Next:",
            f"  1. put the released weights in {opts.weights} (until then the daemon does not start: it",
            "     exits 78 naming what is missing), e.g.:",
            f"       sudo {exe} weights download {opts.weights}",
            f"       sudo {exe} weights check {opts.weights}",
            "  2. start both services, now and at every boot:",
            "       sudo systemctl enable --now infinitetalk infinitetalk-dashboard",
            "  3. watch them:",
            "       systemctl status infinitetalk",
            "       journalctl -u infinitetalk -f            (problems only: -p warning)",
            f"       dashboard: http://{host}:{port}/  (from elsewhere: ssh -L {port}:{host}:{port} THIS-HOST)",
            "  4. let an account drop jobs into the inbox (SFTP, rsync, local):",
            f"       sudo usermod -aG {opts.upload_group} ACCOUNT",
            f"  config: {opts.config}   inbox: {opts.inbox}   outbox: {opts.outbox}",
        ]
    )


def install(opts: InstallOptions, out: object = sys.stdout) -> None:
    """Carry out (or with `dry_run`, print) the whole installation."""
    installer = Installer(opts, out)
    if not opts.dry_run and not installer.fake_root and not installer.privileged:
        raise InstallError(
            "install-systemd changes users, /etc and /srv: run it as root (sudo), "
            "or look first with --dry-run"
        )
    problem = _check_executable(opts)
    if problem and not opts.dry_run:
        raise InstallError(problem)
    if problem:
        installer.say(f"warning: {problem}")
    for action in plan(opts, load_unit_texts(names=opts.unit_names)):
        installer.apply(action)
    installer.say(next_steps(opts))


# ---------------------------------------------------------------- command line


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "install-systemd",
        help="install the systemd units, users, folders and config",
        description="Create the service users and groups, the inbox/outbox/state folders with their "
        "owners and modes, a config file and the two systemd units, then print how to start them. "
        "Safe to run again.",
    )
    parser.add_argument(
        "--prefix",
        type=Path,
        default=DEFAULT_PREFIX,
        help="project checkout whose .venv the units run (default: %(default)s)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="config file to write if missing (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="parent of inbox/, outbox/ and weights/ (default: %(default)s)",
    )
    parser.add_argument(
        "--unit-dir",
        type=Path,
        default=DEFAULT_UNIT_DIR,
        help="where the unit files go (default: %(default)s)",
    )
    parser.add_argument("--user", default=DEFAULT_USER, help="daemon user and group (default: %(default)s)")
    parser.add_argument("--web-user", default=DEFAULT_WEB_USER, help="dashboard user (default: %(default)s)")
    parser.add_argument(
        "--upload-group",
        default=DEFAULT_UPLOAD_GROUP,
        help="group allowed to write the inbox (default: %(default)s)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="install into this directory as if it were / (tests, images)",
    )
    parser.add_argument(
        "--ray-worker",
        metavar="ADDRESS",
        default=None,
        help="on a GPU host of a Ray cluster: install only the Ray worker unit, which joins the head "
        "at ADDRESS (HOST:PORT of `ray start --head`, e.g. gpu-head:6379), and the weights folder",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        opts = InstallOptions(
            prefix=args.prefix,
            config=args.config,
            data_dir=args.data_dir,
            unit_dir=args.unit_dir,
            user=args.user,
            web_user=args.web_user,
            upload_group=args.upload_group,
            root=args.root.resolve(),
            dry_run=args.dry_run,
            ray_worker=args.ray_worker,
        )
        install(opts)
    except InstallError as e:
        print(f"infinitetalk install-systemd: {e}", file=sys.stderr)
        return 1
    return 0
