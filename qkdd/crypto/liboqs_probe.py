"""Finding the liboqs C library without importing liboqs-python.

Importing ``oqs`` on a machine without liboqs makes liboqs-python clone and build liboqs
from the network, so qkdd imports it only after this probe has loaded the library
itself. The search mirrors liboqs-python's own loader (``oqs.oqs._load_liboqs``) in the
same order, with the same loader, so "found here" means "liboqs-python will load it":

1. ``ctypes.util.find_library("liboqs")`` then ``find_library("oqs")`` (the dynamic
   linker cache, ``LD_LIBRARY_PATH``);
2. ``$OQS_INSTALL_PATH/lib`` then ``$OQS_INSTALL_PATH/lib64`` (``~/_oqs`` when the
   variable is unset).

Directories liboqs-python does *not* search (``/usr/local/lib`` outside the linker
cache, ...) are only looked at to tell the operator what to fix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# Places a package manager or ``cmake --install`` commonly puts the library; used only
# for the hint in :func:`explain_missing`, never to load from.
_COMMON_DIRS = (
    "/usr/local/lib",
    "/usr/local/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/opt/liboqs/lib",
)


@dataclass(frozen=True)
class LiboqsLibrary:
    """A liboqs shared library that loaded, and the version it reports."""

    path: str
    version: str


def _library_file_name() -> str:
    return "liboqs.dylib" if platform.system() == "Darwin" else "liboqs.so"


def install_dir() -> Path:
    """The install prefix liboqs-python uses: ``$OQS_INSTALL_PATH`` or ``~/_oqs``."""
    configured = os.environ.get("OQS_INSTALL_PATH")
    return Path(configured) if configured is not None else Path.home() / "_oqs"


def candidate_paths() -> list[str]:
    """Every path liboqs-python would try, in its order (first that loads wins)."""
    candidates: list[str] = []
    # liboqs-python inserts each find_library hit at the front, "oqs" first and then
    # "liboqs", so the "liboqs" hit is tried first.
    for name in ("oqs", "liboqs"):
        try:
            found = ctypes.util.find_library(name)
        except Exception:  # find_library runs ldconfig/gcc: any failure means no hit
            found = None
        if found:
            candidates.insert(0, found)
    prefix = install_dir().absolute()
    candidates += [str(prefix / sub / _library_file_name()) for sub in ("lib", "lib64")]
    return candidates


def probe() -> LiboqsLibrary | None:
    """The library liboqs-python would load, or None (nothing is imported from ``oqs``)."""
    for path in candidate_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:  # liboqs-python skips it too
            continue
        # liboqs-python takes the first file that loads; if that is not liboqs, its
        # import would fail, so report "not found" rather than look further.
        try:
            lib.OQS_version.restype = ctypes.c_char_p
            raw = lib.OQS_version()
        except AttributeError:
            return None
        return LiboqsLibrary(path=path, version=raw.decode("ascii", "replace") if raw else "?")
    return None


def find_liboqs() -> str | None:
    """Path of the liboqs shared library liboqs-python would load, or None."""
    found = probe()
    return found.path if found is not None else None


def explain_missing() -> str:
    """An operator-facing sentence on why liboqs was not found and what to do."""
    prefix = install_dir()
    stray = [
        str(Path(d) / _library_file_name())
        for d in _COMMON_DIRS
        if (Path(d) / _library_file_name()).exists()
    ]
    if stray:
        return (
            f"liboqs C library not found where liboqs-python looks, but {stray[0]} exists: "
            f"run ldconfig, or set OQS_INSTALL_PATH to its install prefix "
            f"(the directory holding lib/{_library_file_name()})"
        )
    return (
        f"liboqs C library not found (looked in the linker cache and {prefix}/lib, "
        f"{prefix}/lib64): install liboqs with -DBUILD_SHARED_LIBS=ON and set "
        'OQS_INSTALL_PATH to its install prefix, or use backend = "cryptography"'
    )
