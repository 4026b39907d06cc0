"""Fast readers for the two formats every sample is made of: tar members and .npy arrays.

Python's tarfile and numpy's np.load parse each header in general-purpose Python (tarfile
objects per member, np.load evaluates the header dict with ast.literal_eval and copies the data
through BytesIO). At about seven members and four arrays per sample that overhead capped the
loader near 1,000 samples/s per core. Here an uncompressed shard is mapped into memory and its
members are handed out as zero-copy, read-only views of the page cache: no read() copy, no
zeroed buffer, and a shuffle buffer full of samples costs page cache (shared, reclaimable), not
process memory.
Anything outside the simple layouts is refused (tar) or handed back to numpy (npy), so these
readers are never less correct than the general ones.

Shards are immutable once written (the writer renames complete files into place); a shard cut
short *while* it is mapped would raise SIGBUS, which is why nothing may rewrite a shard in place.
"""

from __future__ import annotations

import functools
import io
import math
import mmap
import re
import tarfile
import zlib
from collections.abc import Iterator
from os import PathLike

import numpy as np

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(
    rb"\{'descr': '(<f[248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}\s*$"
)


def is_plain_tar(head: bytes | bytearray | memoryview) -> bool:
    """Whether `head` starts an uncompressed ustar/pax/gnu tar (the fast reader's domain)."""
    return len(head) >= BLOCK and bytes(head[257:262]) == b"ustar"


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes ≥ 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


# The checksum is the byte sum of the header with its own field read as spaces. Over at most 256
# bytes adler32 is 1 + sum (no modulo, no high half): a C-speed byte sum, in three spans.
def _checksum_ok(header: bytes) -> bool:
    want = _number(header[148:156])
    unsigned = (
        (
            (zlib.adler32(header[0:148]) & 0xFFFF)
            + (zlib.adler32(header[156:356]) & 0xFFFF)
            + (zlib.adler32(header[356:512]) & 0xFFFF)
        )
        - 3
        + 8 * 32
    )
    if want == unsigned:
        return True
    high = int((np.frombuffer(header, np.uint8) >= 128).sum())  # old tars summed signed bytes
    return want == unsigned - 2 * 128 * high


def _pax_fields(data: bytes) -> dict[str, str]:
    """Records "LEN key=value\\n" of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "replace")


def iter_tar(data: bytes | bytearray | memoryview | mmap.mmap) -> Iterator[tuple[str, memoryview]]:
    """(name, contents) of each regular member of an uncompressed tar held in `data`, in order;
    contents are views of `data`, not copies.

    Understands ustar, pax ('x' path/size records) and GNU long names. Raises tarfile.ReadError
    for a corrupt header or a truncated archive, including one cut exactly at a member boundary
    (no end-of-archive block), which tarfile itself accepts silently."""
    view = memoryview(data)
    end, pos = len(view), 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        if pos + BLOCK > end:
            raise tarfile.ReadError("no end-of-archive marker: the tar was cut short")
        header = bytes(view[pos : pos + BLOCK])  # 512 bytes: slicing bytes beats memoryview
        if header == _ZERO_BLOCK:
            return
        if not _checksum_ok(header):
            raise tarfile.ReadError("bad tar header checksum")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        start = pos + BLOCK
        pos = start + size + (-size % BLOCK)
        if pos > end:
            raise tarfile.ReadError("unexpected end of data in a member")
        body = view[start : start + size]
        if kind == b"x":
            pax = _pax_fields(bytes(body))
            continue
        if kind == b"L":
            long_name = _text(bytes(body))
            continue
        if kind in _REGULAR:
            if long_name is not None:
                name = long_name
            elif "path" in pax:
                name = pax["path"]
            else:
                name = _text(header[:100])
                if header[345] and header[257:263] == b"ustar\0":  # GNU keeps times there
                    name = _text(header[345:500]) + "/" + name
            yield name, body
        long_name, pax = None, {}


def map_file(path: str | PathLike[str]) -> mmap.mmap | bytes:
    """The file's contents, mapped read-only (views of it are read-only numpy arrays; copy
    before writing). Empty files come back as b"", and a file system that cannot map files
    gets the whole file read into memory."""
    with open(path, "rb") as f:
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty: nothing to map
            return b""
        except OSError:  # e.g. ENODEV on some FUSE mounts
            return f.read()


def tar_members(
    path: str | PathLike[str] | bytes | bytearray,
) -> Iterator[tuple[str, memoryview | bytes]]:
    """(name, contents) of each regular member of the tar at `path` (or held in memory: a
    fetched remote shard), in order. Plain tars (all shards we write, img2dataset's) are mapped
    and parsed in place; compressed ones stream through tarfile. Raises tarfile.ReadError /
    OSError / EOFError / zlib.error on damage."""
    held = isinstance(path, (bytes, bytearray))
    data = path if held else map_file(path)
    if is_plain_tar(memoryview(data)[:BLOCK]):
        yield from iter_tar(data)
        return
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r|*")
        if held
        else tarfile.open(path, mode="r|*")
    ) as tf:
        for info in tf:
            if info.isreg():
                member = tf.extractfile(info)
                yield info.name, member.read() if member is not None else b""


def split_key(name: str) -> tuple[str | None, str]:
    """WebDataset's member naming: ("dir/key", "ext.ext2") for "dir/key.ext.ext2"; (None, "")
    for a name with no extension."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None, ""
    return name[:dot], name[dot + 1 :]


@functools.lru_cache(maxsize=1024)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of a simple .npy header, or None. Cached: a shard set repeats a handful
    of headers (T5 varies only in its token count)."""
    match = _NPY_HEADER.match(header)
    if match is None:
        return None
    dims = tuple(int(d) for d in match.group(2).split(b",") if d.strip())
    return np.dtype(match.group(1).decode()), dims


def read_npy(data: bytes | bytearray | memoryview) -> np.ndarray:
    """The array in .npy bytes; little-endian float arrays in C order (what the shard writer
    stores) are viewed without copying (read-only unless `data` is writable), anything else
    goes through np.load.

    Raises ValueError for bytes that are not a complete .npy file."""
    view = memoryview(data)
    if view[:6] == _NPY_MAGIC and view[6] in (1, 2, 3):
        start = 10 if view[6] == 1 else 12
        hlen = int.from_bytes(view[8:start], "little")
        layout = _npy_layout(bytes(view[start : start + hlen]))
        if layout is not None:
            dtype, dims = layout
            count = math.prod(dims)
            offset = start + hlen
            if len(view) - offset != count * dtype.itemsize:
                raise ValueError(
                    f"npy data holds {len(view) - offset} bytes, header says "
                    f"{count * dtype.itemsize}"
                )
            return np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(dims)
    return np.load(io.BytesIO(bytes(view)), allow_pickle=False)
