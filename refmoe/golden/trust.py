"""Reading and writing fixture and dump directories that are not trusted (docs/golden-format.md#trust).

    check_name(name, source)        a case name is a plain name: letters, digits, '_' and '-'
    check_directory(path, what)     a directory, not a symlink to one
    open_regular(path, what)        a binary file object of a regular file, never opened through a symlink
    write_bytes(path, data)         write a temporary file beside ``path`` and rename it over ``path``;
                                    a symlink or a non-regular file at ``path`` is refused
    NpzArchive(path, what)          an ``.npz`` whose ``.npy`` headers are read (and checked) first; the data
                                    of a member is read only when asked for, bounded by its header's shape

Every problem is a GoldenFormatError whose message names the file (and the key), so the command line can
print it as one line and exit 2.
"""
from __future__ import annotations

import os
import re
import stat
import zipfile
from typing import NamedTuple

import numpy as np

NAME = re.compile(r"[A-Za-z0-9_-]+")
PLAIN_KINDS = "biuf"                      # bool, signed and unsigned integers, floats
KIND_NAMES = {"b": "bool", "i": "signed integer", "u": "unsigned integer", "f": "floating"}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted in a directory must not block the reader


class GoldenFormatError(ValueError):
    """A fixture or a dump is missing, malformed, tampered with or holds pickled objects."""


# ----------------------------------------------------------------------------------------------
# names, directories and files
# ----------------------------------------------------------------------------------------------

def short(value, width: int = 80) -> str:
    """``repr(value)``, cut to ``width`` characters (a tampered field may be huge or deeply nested)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= width else text[:width - 3] + "..."


def check_name(name, source: str) -> str:
    """``name`` itself if it is a plain case name (so ``<name>.npz`` stays inside its directory)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise GoldenFormatError(f"{source}: case name {short(name)} is not a plain name "
                                "(letters, digits, '_' and '-' only)")
    return name


def _strip(path) -> str:
    path = os.fspath(path)
    return path.rstrip(os.sep) or os.sep          # lstat("link/") would follow the link


def check_directory(path, what: str) -> str:
    """``path`` if it is a directory and not a symlink; GoldenFormatError otherwise."""
    path = _strip(path)
    if os.path.islink(path):
        raise GoldenFormatError(f"{path}: the {what} is a symlink; give the directory itself")
    if not os.path.isdir(path):
        raise GoldenFormatError(f"{path}: {what} {'is not a directory' if os.path.lexists(path) else 'not found'}")
    return path


def entry_state(path, what: str) -> str:
    """"missing" or "file" for ``path``; a symlink or anything but a regular file is refused."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        raise GoldenFormatError(f"{path}: the {what} is a symlink; refusing to follow it")
    if not stat.S_ISREG(mode):
        raise GoldenFormatError(f"{path}: the {what} is not a regular file")
    return "file"


def open_regular(path, what: str):
    """A binary file object for reading the regular file ``path`` (not through a symlink)."""
    if entry_state(path, what) == "missing":
        raise GoldenFormatError(f"{path}: {what} not found")
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except OSError as exc:
        raise GoldenFormatError(f"{path}: cannot open the {what} ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise GoldenFormatError(f"{path}: the {what} is not a regular file")
    return os.fdopen(fd, "rb")


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fresh file in the same directory, renamed over ``path``.

    A symlink (or a directory, a FIFO ...) at ``path`` is refused, and the rename replaces a hard-linked
    file's name instead of writing into the file it shares, so nothing outside the directory changes.
    OSError (an unwritable directory) propagates.
    """
    entry_state(path, "file to write")
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# .npz archives, headers first
# ----------------------------------------------------------------------------------------------

class Member(NamedTuple):
    key: str                  # the member's name without ".npy"
    shape: tuple
    dtype: np.dtype
    fortran: bool
    info: zipfile.ZipInfo


def _read_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f".npy format version {version} (1.0 and 2.0 are read)")


class NpzArchive:
    """The members of an ``.npz``, by key, from their ``.npy`` headers; ``archive[key]`` reads one array.

    Opening reads every member's header (never its data) and refuses: a member that is not ``<key>.npy``,
    a repeated key, an object dtype (a pickle), a dtype that is not a plain number, and a member whose
    declared uncompressed size exceeds what its header's shape needs (a decompression bomb).
    """

    def __init__(self, path, what: str, fileobj=None):
        self.path, self.what = os.fspath(path), what
        self.file = open_regular(path, what) if fileobj is None else fileobj   # fileobj: bytes already read
        try:
            self.zip = zipfile.ZipFile(self.file)
            self.members = self._members()
        except GoldenFormatError:
            self.close()
            raise
        except Exception as exc:  # zipfile.BadZipFile, a truncated header, a bad CRC ...
            self.close()
            raise GoldenFormatError(
                f"{self.path}: not a readable .npz file ({type(exc).__name__}: {str(exc)[:120]})") from None

    def _members(self) -> dict:
        out = {}
        for info in self.zip.infolist():
            if not info.filename.endswith(".npy"):
                raise GoldenFormatError(f"{self.path}: member {short(info.filename)} is not a .npy array")
            key = info.filename[:-4]
            shown = short(key)
            if key in out:
                raise GoldenFormatError(f"{self.path}: key {shown} appears twice")
            with self.zip.open(info) as f:
                try:
                    shape, fortran, dtype = _read_header(f)
                except ValueError as exc:
                    raise GoldenFormatError(
                        f"{self.path}: array {shown} has no readable .npy header ({str(exc)[:120]})") from None
                header_size = f.tell()
            if dtype.hasobject:
                raise GoldenFormatError(f"{self.path}: array {shown} holds pickled Python objects; refusing to "
                                        "load it (fixtures and dumps must hold numeric arrays only)")
            if dtype.kind not in PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
                raise GoldenFormatError(f"{self.path}: array {shown} has dtype {dtype}; expected plain numbers")
            needed = header_size + int(np.prod(shape, dtype=object)) * dtype.itemsize
            if info.file_size > needed:
                raise GoldenFormatError(
                    f"{self.path}: array {shown} declares {info.file_size} bytes uncompressed where its shape "
                    f"{short(tuple(shape))} and dtype {dtype} need {needed}; refusing to decompress it")
            out[key] = Member(key, tuple(shape), dtype, fortran, info)
        return out

    def __contains__(self, key) -> bool:
        return key in self.members

    def __iter__(self):
        return iter(self.members)

    def spec(self, key):
        """(shape, dtype) of ``key`` from its header, without reading its data."""
        m = self.members[key]
        return m.shape, m.dtype

    def __getitem__(self, key) -> np.ndarray:
        m, shown = self.members[key], short(key)
        nbytes = int(np.prod(m.shape, dtype=object)) * m.dtype.itemsize
        try:
            with self.zip.open(m.info) as f:
                _read_header(f)
                data = f.read(nbytes)
        except Exception as exc:  # a bad CRC, a truncated deflate stream ...
            raise GoldenFormatError(
                f"{self.path}: array {shown} cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from None
        if len(data) != nbytes:
            raise GoldenFormatError(f"{self.path}: array {shown} is truncated ({len(data)} of {nbytes} bytes)")
        flat = np.frombuffer(bytearray(data), dtype=m.dtype)            # a writable copy
        return flat.reshape(m.shape[::-1]).T if m.fortran else flat.reshape(m.shape)

    def close(self):
        if getattr(self, "zip", None) is not None:
            self.zip.close()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
