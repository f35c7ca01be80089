"""The light client installed on its own: importing `qkdd.client` (each front end) and `qkdctl`
loads the standard library and nothing else; and in a fresh virtual environment holding only
the project installed with `pip install --no-deps` (no Trio, cryptography, h11 or pyserial), an
asyncio program gets keys from real daemons (the two-site demo: emulator and both daemons as
subprocesses of this interpreter), and `qkdctl` works there too."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from timeouts import timeout

from qkdd.demo import running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B

ROOT = Path(__file__).resolve().parent.parent
# What the daemon needs and an application of the client must not.
HEAVY = {"trio", "cryptography", "h11", "serial", "numpy", "prometheus_client", "google_crc32c"}
LIGHT_MODULES = [
    "qkdd.client",
    "qkdd.client.blocking",
    "qkdd.client.asyncio_client",
    "qkdd.client.trio_client",
    "qkdd.ctl",
]

IMPORTS = """
import json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_importing_the_client_loads_only_the_standard_library() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS, *LIGHT_MODULES],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    tops = {name.split(".")[0] for name in loaded}
    assert not tops & HEAVY, sorted(tops & HEAVY)
    assert tops - {"qkdd"} <= set(sys.stdlib_module_names), sorted(
        tops - {"qkdd"} - set(sys.stdlib_module_names)
    )
    daemon_side = [
        name
        for name in loaded
        if name.startswith("qkdd.")
        and not name.startswith("qkdd.client")
        and name not in ("qkdd.http_server", "qkdd.http_server.paths", "qkdd.ctl")
    ]
    assert daemon_side == []


APP = """
import asyncio, json, sys

import qkdd.client
from qkdd.client import AsyncioKeyClient, KeyServiceClientError

async def main(sock_a, sock_b, sae_a, sae_b):
    async with AsyncioKeyClient(sock_a) as app_a, AsyncioKeyClient(sock_b) as app_b:
        keys = await app_a.enc_keys(sae_b, number=4)
        got = await app_b.dec_keys(sae_a, [k.key_id for k in keys])
        try:
            await app_b.dec_keys(sae_a, [keys[0].key_id])
            again = None
        except KeyServiceClientError as exc:
            again = exc.status
        sent_id = await app_a.send_message(sae_b, b"from the light client")
        async for message in app_b.messages():
            await app_b.acknowledge_message(message.message_id)
            break
    print(json.dumps({
        "sent": [[k.key_id, k.material.hex()] for k in keys],
        "got": [[k.key_id, k.material.hex()] for k in got],
        "again": again,
        "message": [sent_id, message.message_id, message.body.decode(), message.sender_sae_id],
        "client_file": qkdd.client.__file__,
        "modules": sorted(sys.modules),
    }))

asyncio.run(main(*sys.argv[1:]))
"""

# A pip that could not fetch the build backend (setuptools) from the package index.
NO_INDEX = (
    "No matching distribution found for setuptools",
    "Could not find a version that satisfies the requirement setuptools",
    "Failed to establish a new connection",
)


def light_environment(tmp_path: Path) -> Path:
    """A fresh venv (no system site packages) with the project installed as the README says:
    `pip install --no-deps`, from a copy of the tree (a build writes into its source)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("qkdd", "drivers"):
        shutil.copytree(
            ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    venv = tmp_path / "app-env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=timeout(300))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-deps", str(source)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout(600),
    )
    if done.returncode != 0 and any(text in done.stdout + done.stderr for text in NO_INDEX):
        pytest.skip(f"pip could not fetch the build backend: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def readme_example(socket_path: Path) -> str:
    """The README's asyncio example, pointed at `socket_path`."""
    readme = (ROOT / "README.md").read_text()
    assert "pip install --no-deps" in readme  # the install light_environment performs
    (example,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
        if "AsyncioKeyClient" in block
    ]
    assert "/run/qkdd/api.sock" in example
    return example.replace("/run/qkdd/api.sock", str(socket_path))


def test_an_asyncio_application_gets_keys_with_only_the_light_client(tmp_path: Path) -> None:
    venv = light_environment(tmp_path)
    python = str(venv / "bin" / "python")
    for heavy in sorted(HEAVY - {"numpy"}):  # not installed there: the client must not need them
        absent = subprocess.run(
            [python, "-I", "-c", f"import {heavy}"], capture_output=True, timeout=timeout(60)
        )
        assert absent.returncode != 0, f"{heavy} is installed in the light environment"
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(APP))
    with running_demo(tmp_path / "demo") as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 16, timeout=timeout(90))
        done = subprocess.run(
            [
                python,
                "-I",  # neither this tree nor PYTHONPATH: only what the venv installed
                str(app),
                str(site_a.socket_path),
                str(site_b.socket_path),
                SITE_A.sae_id,
                SITE_B.sae_id,
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=timeout(120),
        )
        assert done.returncode == 0, done.stderr
        readme = subprocess.run(
            [python, "-I", "-c", readme_example(site_a.socket_path)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=timeout(120),
        )
        ctl = subprocess.run(
            [str(venv / "bin" / "qkdctl"), "--socket", str(site_a.socket_path), "--compact"]
            + ["status", SITE_B.sae_id],
            capture_output=True,
            text=True,
            timeout=timeout(60),
        )
    result = json.loads(done.stdout)
    assert result["client_file"].startswith(str(venv))
    assert not {name.split(".")[0] for name in result["modules"]} & HEAVY
    # The slave's application got exactly the keys the master's did, and only once.
    assert len(result["sent"]) == 4 and result["got"] == result["sent"]
    assert len({material for _id, material in result["sent"]}) == 4
    assert result["again"] == 400
    sent_id, received_id, body, sender = result["message"]
    assert (received_id, body, sender) == (sent_id, "from the light client", SITE_A.sae_id)
    assert readme.returncode == 0, readme.stderr
    assert len(ast.literal_eval(readme.stdout)) == 2  # the README's two key IDs
    assert ctl.returncode == 0, ctl.stderr
    status = json.loads(ctl.stdout)
    assert (status["master_SAE_ID"], status["slave_SAE_ID"]) == (SITE_A.sae_id, SITE_B.sae_id)
