"""The README's "Install on a site host", followed step by step as a new operator would, on
a fresh Debian 12 booted with a real systemd (``systemd-nspawn -b``).

The commands in the README's shell blocks are run as written, line by line, in a root
shell inside the container (only the placeholders ``/path/to/qkdd-clone`` and the
emulator's ``NAME`` are filled in, and ``journalctl -f`` is read once instead of followed).
The steps given in prose (the emulator's env file, the config edits, pinning the peer's
key) are done the way they describe. The site has no QKD hardware, so it runs its half of
the emulator (step 3); the peer site does not exist, which must not keep the daemon from
starting, reporting READY and serving its status. Checked on the way:

* step 7 starts the service, which reports READY=1 and a STATUS= line; its journal holds
  no key material; ``systemctl reload qkdd`` applies a changed ``key_lifetime`` without a
  restart; ``systemd-analyze security`` rates the unit as the README says.
* With both units stopped, ``systemctl start qkdd.socket`` alone starts no daemon; the
  first request does (socket activation).
* ``qkdctl status`` with no arguments answers, for root and for a member of qkdd-users,
  and refuses anybody else.
* The secrets reach the daemon only as LoadCredential= credentials: the daemon runs with
  ``credential:`` in its config, the copies in $CREDENTIALS_DIRECTORY are the files in
  /etc/credstore, and without the file the start fails naming the missing credential.
* ``systemctl stop qkdd.socket qkdd.service`` leaves nothing behind: no process, socket,
  credential copy, private /tmp or SQLite WAL.

A README step that fails as written is reported with its command and output. Where the
walk can go on (a check that changes nothing; the emulator's env file, written again
without the notes that broke it) it does, and the test fails at the end with every such
failure.

Needs root and the network (Debian's mirror and PyPI); installs systemd-container and
debootstrap with apt-get when they are missing, and skips saying why where it cannot.
The root file system is cached under /var/tmp/qkdd-nspawn/ (see systemd_boot_container).
"""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from systemd_boot_container import (
    CACHE,
    CONTAINER_PIP_CACHE,
    Container,
    Result,
    Unavailable,
    cached_rootfs,
)
from systemd_boot_container import ensure_tools as ensure_host_tools
from timeouts import timeout

# Slow as well: it installs packages on the host and builds a root file system, so the
# default run leaves it out; `-m integration` (or `-m slow`) selects it.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
# Where, inside the container, the operator keeps the clone the README installs from.
CLONE = "/usr/local/src/qkdd-clone"
EMULATOR = "lab"
APP_USER = "app"  # an application allowed to call the API (group qkdd-users)
OTHER_USER = "other"  # a user who is not
PEER_SITE = "site-b"
PIP_CACHE = CACHE / "pip-cache"


@pytest.fixture
def container() -> Iterator[Container]:
    try:
        ensure_host_tools()
        rootfs = cached_rootfs()
    except Unavailable as exc:
        pytest.skip(str(exc))
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    # pip's cache survives between runs (downloads only; every run installs afresh).
    box = Container(rootfs, binds=[(PIP_CACHE, CONTAINER_PIP_CACHE)])
    try:
        box.prepare()
        box.copy_in(REPO, _repository_files(), CLONE)
        box.boot()
        yield box
    finally:
        box.destroy()


def _repository_files() -> list[str]:
    """What a clone holds: tracked files and new ones not ignored (no .venv, no caches)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout(60),
    ).stdout.splitlines()
    return [name for name in listed if (REPO / name).is_file()]


def _diagnostics(box: Container) -> str:
    units = f"-u qkdd.socket -u qkdd.service -u qkd-emulator@{EMULATOR}.service"
    result = box.run(
        f"systemctl --no-pager status qkdd.socket qkdd.service; "
        f"journalctl --no-pager -o short-monotonic {units} | tail -80",
        check=False,
    )
    return f"--- container state on failure\n{result.stdout}{result.stderr}"


def _free_port() -> int:
    """A TCP port free on the host: the container shares the host's network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the README -----------------------------------------------------------------------


def install_section() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"^## Install on a site host\n(.*?)^## ", readme, re.M | re.S)
    assert match, 'README.md has no section "## Install on a site host"'
    return match.group(1)


def shell_blocks(section: str) -> list[list[str]]:
    """The lines of each ```sh block, in order (blank lines dropped)."""
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [[line.strip() for line in block.splitlines() if line.strip()] for block in blocks]


def filled_in(line: str, placeholder: str, value: str) -> str:
    assert placeholder in line, f"the README no longer has {placeholder!r} in: {line}"
    return line.replace(placeholder, value)


def readme_step(
    box: Container, line: str, *, limit: float = 120, failures: list[str] | None = None
) -> Result:
    """One README command, as root in the clone; its failure is reported as the README's.
    With ``failures``, a failure is recorded there and the walk goes on (for a step the
    walk can step over or repair, so the steps after it still get checked)."""
    result = box.run(line, cwd=CLONE, check=False, limit=limit)
    if result.returncode != 0:
        message = f"README step failed as written:\n{result.describe()}"
        assert failures is not None, message
        failures.append(message)
    return result


def emulator_env(port: int, *, strip_comments: bool) -> str:
    """/etc/qkdd/emulator-NAME.env "as the head of systemd/qkd-emulator@.service shows"
    (its example lines without the comment sign in front), for the listening host
    (alice), on a free loopback port of this host. EnvironmentFile= keeps a trailing
    ``# ...`` as part of the value: ``strip_comments`` drops the notes the head puts there."""
    unit = (REPO / "systemd" / "qkd-emulator@.service").read_text()
    lines = []
    for name in (
        "QKD_EMULATOR_ROLE",
        "QKD_EMULATOR_PEER",
        "QKD_EMULATOR_FLAGS",
        "QKD_EMULATOR_SITES",
    ):
        match = re.search(rf"^#\s+({name}=.*?)(\s+#.*)?$", unit, re.M)
        assert match, f"the head of qkd-emulator@.service no longer shows {name}="
        lines.append(match.group(1) if strip_comments else match.group(0).lstrip("#").strip())
    text = "\n".join(lines) + "\n"
    assert "QKD_EMULATOR_ROLE=alice" in text and "--listen 0.0.0.0:7455" in text, text
    return text.replace("0.0.0.0:7455", f"127.0.0.1:{port}")


def site_config(example: str, *, listen_port: int, app_uid: int) -> str:
    """Step 5's edits of config/site-host.example.toml: this site's listen address, the
    consumer's uid, and the device the emulator half provides. The site ID, the peer
    (site-b at an address nobody answers) and the pinned key's path stay as shipped."""
    edits = [
        ('listen = "0.0.0.0:47101"', f'listen = "127.0.0.1:{listen_port}"'),
        ("uid = 1001", f"uid = {app_uid}"),
        ('path = "/dev/qkd0"', f'path = "/run/qkd-emulator/{EMULATOR}/link"'),
    ]
    for old, new in edits:
        assert example.count(old) == 1, f"config/site-host.example.toml: expected one {old!r}"
        example = example.replace(old, new)
    for expected in (
        'site_id = "site-a"',
        f'site_id = "{PEER_SITE}"',
        'public_key_file = "/etc/qkdd/site-b.pub"',
        'private_key = "credential:qkdd-identity"',
        'key_encryption_key = "credential:qkdd-kek"',
        "key_lifetime = 3600",
    ):
        assert expected in example, f"config/site-host.example.toml: no {expected!r}"
    return example


# --- checks -----------------------------------------------------------------------------


def unit_properties(box: Container, unit: str, *names: str) -> dict[str, str]:
    out = box.run(f"systemctl show {unit} -p {','.join(names)}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(what: str, probe: Callable[[], tuple[bool, object]]) -> object:
    """Poll ``probe`` (-> done, what it saw) until done; only a hang ends the wait."""
    deadline = time.monotonic() + timeout(60)
    while True:
        done, seen = probe()
        if done:
            return seen
        if time.monotonic() >= deadline:  # only a hang gets here
            raise AssertionError(f"waited in vain for {what}; last saw: {seen}")
        time.sleep(0.2)


def wait_active(box: Container, unit: str) -> dict[str, str]:
    """ActiveState=active (for a Type=notify service: systemd got READY=1) and a STATUS=
    line; whatever else the unit shows if it fails instead."""

    def probe() -> tuple[bool, object]:
        props = unit_properties(box, unit, "ActiveState", "SubState", "StatusText", "MainPID")
        settled = props["ActiveState"] in ("active", "failed", "inactive")
        return settled and (props["ActiveState"] != "active" or bool(props["StatusText"])), props

    props = wait_for(f"{unit} to settle", probe)
    assert isinstance(props, dict)
    return props


def journal(box: Container, unit: str = "qkdd.service") -> str:
    return box.run(f"journalctl --no-pager -o cat -u {unit}").stdout


def wait_for_journal(box: Container, text: str) -> str:
    """The unit's journal once it holds ``text`` (the daemon's lines reach journald over a
    stream, after the state change systemctl already reports)."""

    def probe() -> tuple[bool, object]:
        logged = journal(box)
        return text in logged, logged[-2000:]

    return str(wait_for(f"{text!r} in the journal", probe))


def credstore_file(box: Container, name: str) -> bytes:
    return (box.root / "etc" / "credstore" / name).read_bytes()


def test_readme_install_on_a_site_host(container: Container) -> None:
    failures: list[str] = []
    try:
        follow_the_readme(container, failures)
        assert not failures, "\n".join(failures)
    except BaseException:
        print(_diagnostics(container))  # shown by pytest with the failure
        raise


def follow_the_readme(box: Container, failures: list[str]) -> None:
    section = install_section()
    prose = " ".join(section.split())  # for sentences the README wraps over lines
    blocks = shell_blocks(section)
    assert len(blocks) == 5, f"expected the shell blocks of steps 1, 2, 3, 4 and 7: {blocks}"
    install, users_and_units, emulator, secrets_block, start_and_watch = blocks

    # 1. Install.
    for line in install:
        if "/path/to/qkdd-clone" in line:
            line = filled_in(line, "/path/to/qkdd-clone", CLONE)
        readme_step(box, line, limit=900)

    # 2. User, groups, directories.
    for line in users_and_units:
        readme_step(box, line)
    box.run("getent passwd qkdd && getent group qkdd-users")

    # 3. The QKD device: this host has none and runs the listening half of the emulator.
    env_file = box.root / "etc" / "qkdd" / f"emulator-{EMULATOR}.env"
    emulator_port = _free_port()
    env_file.write_text(emulator_env(emulator_port, strip_comments=False))
    started = True
    for line in emulator:
        result = readme_step(
            box, line.replace("@NAME.service", f"@{EMULATOR}.service"), failures=failures
        )
        started = started and result.returncode == 0
    if not started:
        why = journal(box, f"qkd-emulator@{EMULATOR}.service").splitlines()[-8:]
        failures.append("qkd-emulator@NAME journal:\n" + "\n".join(why) + "\n")
        # Recorded; with the head's notes dropped from the values the steps go on.
        env_file.write_text(emulator_env(emulator_port, strip_comments=True))
        box.run(f"systemctl reset-failed qkd-emulator@{EMULATOR}.service")
        box.run(f"systemctl restart qkd-emulator@{EMULATOR}.service")
    box.run(f"test -e /run/qkd-emulator/{EMULATOR}/link")

    # 4. Secrets.
    keygen_output = ""
    for line in secrets_block:
        keygen_output += readme_step(box, line).stdout
    assert "public_key = " in keygen_output, keygen_output

    # 5. Config. The application's user exists first, so its uid goes into the config.
    box.run(f"useradd --create-home {APP_USER} && usermod -aG qkdd-users {APP_USER}")
    box.run(f"useradd --create-home {OTHER_USER}")
    app_uid = int(box.run(f"id -u {APP_USER}").stdout)
    readme_step(box, "cp config/site-host.example.toml /etc/qkdd/qkdd.toml")
    config_file = box.root / "etc" / "qkdd" / "qkdd.toml"
    config_file.write_text(
        site_config(config_file.read_text(), listen_port=_free_port(), app_uid=app_uid)
    )
    check = "qkdd check-config /etc/qkdd/qkdd.toml"
    assert f"`{check}`" in prose

    # 6. Pair the two sites: the peer's operator made its identity with the same keygen and
    # sent the public key file; this site pins it where the example config points.
    box.run("qkdd keygen --out /var/tmp/peer-identity >/dev/null")
    box.run(f"cp /var/tmp/peer-identity.pub /etc/qkdd/{PEER_SITE}.pub")
    # Its `qkdd allow-bootstrap` needs the daemon's key store: run below, once it runs.
    readme_step(box, check)  # the pinned key is readable

    # 7. Start and watch.
    enable, status_line, follow = start_and_watch
    readme_step(box, enable)
    enabled = box.run("systemctl is-enabled qkdd.socket qkdd.service").stdout.split()
    assert enabled == ["enabled", "enabled"], enabled
    # READY=1 (a Type=notify service is active only after it) and a STATUS= line.
    assert unit_properties(box, "qkdd.service", "Type")["Type"] == "notify"
    props = wait_active(box, "qkdd.service")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["StatusText"].startswith(f"{PEER_SITE}: "), props
    wait_for_journal(box, "event=ready site=site-a")
    pid = props["MainPID"]
    status = readme_step(box, status_line).stdout
    assert re.search(rf'Status: "{PEER_SITE}: session ', status), status
    follow = filled_in(follow, "journalctl -u qkdd -f", "journalctl -u qkdd --no-pager")
    watched = readme_step(box, follow).stdout
    assert "event=ready" in watched, watched
    for name in ("qkdd-kek", "qkdd-identity"):  # never key material
        secret = credstore_file(box, name)
        for form in (secret.hex(), base64.b64encode(secret).decode()):
            assert form not in watched, f"{name} appears in the journal"

    # `qkdctl status` from the operator's root shell, with no arguments.
    as_root = box.run("qkdctl status")
    assert "site site-a" in as_root.stdout and "QKD device    up" in as_root.stdout, as_root
    # The emulator half named the sites (QKD_EMULATOR_SITES), so the daemon checked that it
    # is attached to its own end of the link instead of warning that it cannot tell.
    assert "device.identity-unknown" not in journal(box)

    # Step 6's `qkdd allow-bootstrap` from the root shell: it reads the key-encryption key
    # where the unit's LoadCredential= does (/etc/credstore), `--revoke` withdraws the
    # allowance, and nothing in the daemon's state directory becomes root's.
    allow = f"qkdd allow-bootstrap --config /etc/qkdd/qkdd.toml {PEER_SITE}"
    assert "`qkdd allow-bootstrap --config /etc/qkdd/qkdd.toml PEER_SITE`" in prose
    assert "is now allowed" in readme_step(box, allow).stdout
    assert "Withdrew" in readme_step(box, f"{allow} --revoke").stdout
    owned_by_root = box.run("find /var/lib/qkdd -user root").stdout.split()
    assert owned_by_root == [], owned_by_root

    # `systemctl reload qkdd` re-reads the config: key_lifetime applies live.
    assert "`systemctl reload qkdd` re-reads the config" in prose
    config_file.write_text(
        config_file.read_text().replace("key_lifetime = 3600", "key_lifetime = 1800")
    )
    readme_step(box, "systemctl reload qkdd")
    wait_for_journal(box, "event=reloaded applied=key_lifetime needs_restart=-")
    props = wait_active(box, "qkdd.service")
    assert (props["ActiveState"], props["MainPID"]) == ("active", pid), props

    # The unit's exposure, as the README rates it.
    assert "`systemd-analyze security qkdd.service` rates the shipped unit 1.2" in prose
    security = readme_step(box, "systemd-analyze security --no-pager qkdd.service").stdout
    assert "Overall exposure level for qkdd.service: 1.2 " in security, security[-400:]

    # Socket activation: with both units stopped, the socket alone starts no daemon...
    box.run("systemctl stop qkdd.socket qkdd.service && systemctl start qkdd.socket")
    assert unit_properties(box, "qkdd.socket", "ActiveState")["ActiveState"] == "active"
    assert unit_properties(box, "qkdd.service", "ActiveState")["ActiveState"] == "inactive"
    socket_owner = box.run("stat -c '%U:%G %a %F' /run/qkdd/api.sock").stdout.strip()
    assert socket_owner == "root:qkdd-users 660 socket", socket_owner
    # ...a user outside qkdd-users is refused without starting it...
    refused = box.run("qkdctl status", user=OTHER_USER, check=False)
    assert refused.returncode != 0 and "permission denied" in refused.stderr, refused.describe()
    assert "Traceback" not in refused.stderr, refused.describe()
    assert unit_properties(box, "qkdd.service", "ActiveState")["ActiveState"] == "inactive"
    # ...and the first request of an application does; `qkdctl status` has no arguments.
    first = box.run("qkdctl status", user=APP_USER, check=False)
    assert first.returncode == 0, first.describe()
    assert "site site-a" in first.stdout and f"peer {PEER_SITE}" in first.stdout, first.stdout
    props = wait_active(box, "qkdd.service")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["StatusText"].startswith(f"{PEER_SITE}: "), props
    assert props["MainPID"] != pid, props
    pid = props["MainPID"]

    # The secrets arrive as credentials, readable by the daemon alone.
    environ = box.run(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout.splitlines()
    assert "CREDENTIALS_DIRECTORY=/run/credentials/qkdd.service" in environ, environ
    for name in ("qkdd-kek", "qkdd-identity"):
        copy = f"/run/credentials/qkdd.service/{name}"
        assert box.run(f"stat -c '%U %a' {copy}").stdout.strip() == "qkdd 400"
        box.run(f"cmp {copy} /etc/credstore/{name}")
    # Without the file, LoadCredential= skips the credential and the daemon says which.
    box.run("mv /etc/credstore/qkdd-kek /var/tmp/qkdd-kek.moved")
    failed = box.run("systemctl restart qkdd.service", check=False)
    box.run("mv /var/tmp/qkdd-kek.moved /etc/credstore/qkdd-kek")
    assert failed.returncode != 0, failed.describe()
    wait_for_journal(box, "systemd credential 'qkdd-kek' is not available")
    box.run("systemctl reset-failed qkdd.service; systemctl restart qkdd.service")
    props = wait_active(box, "qkdd.service")
    assert props["ActiveState"] == "active", props
    box.run("qkdctl status >/dev/null")

    # Stopping leaves nothing behind.
    box.run("systemctl stop qkdd.socket qkdd.service")
    props = unit_properties(box, "qkdd.service", "ActiveState", "Result", "MainPID")
    assert props == {"ActiveState": "inactive", "Result": "success", "MainPID": "0"}, props
    assert unit_properties(box, "qkdd.socket", "ActiveState")["ActiveState"] == "inactive"

    def stopped_last() -> tuple[bool, object]:
        logged = [line for line in journal(box).splitlines() if line.startswith("INFO ")]
        return logged[-1] == "INFO qkdd.daemon event=stopped site=site-a", logged[-5:]

    wait_for("the daemon's last word to be event=stopped", stopped_last)
    leftovers = box.run(
        "grep -l 'qkdd.service' /proc/[0-9]*/cgroup 2>/dev/null;"
        " ls -d /run/qkdd/api.sock /run/credentials/qkdd.service"
        " /tmp/systemd-private-*-qkdd.service-* /var/tmp/systemd-private-*-qkdd.service-*"
        " /var/lib/qkdd/*-wal /var/lib/qkdd/*-shm 2>/dev/null",
        check=False,
    ).stdout.split()
    assert leftovers == [], leftovers
    # Nothing listens any more, so nothing starts the daemon again.
    gone = box.run("qkdctl status", check=False)
    assert gone.returncode != 0 and "Traceback" not in gone.stderr, gone.describe()
    assert unit_properties(box, "qkdd.service", "ActiveState")["ActiveState"] == "inactive"
    # The emulator half too, with its runtime directory; then no process of user qkdd is left.
    box.run(f"systemctl stop qkd-emulator@{EMULATOR}.service")
    assert box.run(f"test -e /run/qkd-emulator/{EMULATOR}", check=False).returncode != 0
    assert box.run("pgrep -u qkdd", check=False).stdout == ""
