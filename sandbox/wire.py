"""What the trusted process, the fork server and a program's process say to each other (standard library only).

A frame is a 4-byte big-endian length, a JSON header (a dict, whose "blobs" lists the sizes of the raw byte
blobs that follow it) and the blobs. Every reader of frames has a bound on one frame's size: what comes from a
program (its response channel) is capped as tightly as its content allows, so a flood there costs the reader
no more than the cap (the fork server then counts what follows without keeping it). This file runs inside
the sandbox too (see ``sandbox/pool.py:worker_source``).
"""

import json
import os
import struct

STATUSES = ("ok", "runtime_error", "time_limit", "memory_limit", "output_limit")
MAX_FRAME = 64 << 20  # a frame between trusted parties (the trusted process and the fork server)
# A program's own response frame: an encoded return value (codec.MAX_ENCODED_BYTES) and a short error text.
MAX_PROGRAM_FRAME = (16 << 20) + (64 << 10)
# A run or call is stopped at its CPU-time limit; its wall clock only backs that up (a program that waits
# instead of computing, or whose child processes compute) at this multiple of the limit.
WALL_FACTOR = 2.0


def known_status(status):
    """A status read from a report that is not trusted: itself if one of STATUSES, else ``runtime_error``."""
    return status if status in STATUSES else "runtime_error"


_FRAME_ENCODER = json.JSONEncoder(separators=(",", ":"))  # (made once: json.dumps with options makes one per call)


def pack_frame(header, blobs=()):
    header = dict(header, blobs=[len(b) for b in blobs])
    head = _FRAME_ENCODER.encode(header).encode()
    return struct.pack(">I", len(head)) + head + b"".join(blobs)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class FrameReader:
    """Incremental parser of frames; ``feed`` returns the complete frames as (header, blobs). A frame that
    announces more than ``limit`` bytes (header and blobs) is malformed: ValueError as soon as its sizes are
    read, so no more than ``limit`` bytes are ever buffered. ``relayed``: a call session's channel, where a frame
    ``{"answer": 1}`` announces a program's own frame, relayed as it wrote it (``sandbox/calls.py``), which is
    returned as ({"program_frame": True}, [its header, undecoded])."""

    def __init__(self, limit=MAX_FRAME, relayed=False):
        self.buf = bytearray()
        self.limit = limit
        self.relayed = relayed
        self.raw_next = False

    def feed(self, data):
        self.buf += data
        frames = []
        while len(self.buf) >= 4:
            (n_head,) = struct.unpack(">I", self.buf[:4])
            if n_head > self.limit:
                raise ValueError("a frame header of %d bytes" % n_head)
            if len(self.buf) < 4 + n_head:
                break
            if self.raw_next:  # (a program's frame has no blobs: its header is all of it)
                frames.append(({"program_frame": True}, [bytes(self.buf[4 : 4 + n_head])]))
                del self.buf[: 4 + n_head]
                self.raw_next = False
                continue
            header = json.loads(bytes(self.buf[4 : 4 + n_head]))
            sizes = header.get("blobs", []) if type(header) is dict else None
            if type(sizes) is not list or not all(type(s) is int and s >= 0 for s in sizes):
                raise ValueError("malformed frame header")
            end = 4 + n_head + sum(sizes)
            if end > self.limit + 4:
                raise ValueError("a frame of %d bytes" % end)
            if len(self.buf) < end:
                break
            blobs, pos = [], 4 + n_head
            for s in sizes:
                blobs.append(bytes(self.buf[pos : pos + s]))
                pos += s
            del self.buf[:end]
            frames.append((header, blobs))
            self.raw_next = self.relayed and "answer" in header
        return frames


_pending = {}  # fd -> (FrameReader, frames read but not yet returned)


def read_frame(fd):
    """Blocking read of one frame from a trusted peer; None at EOF. Bytes read past the frame (the next
    frames, sent right after) are kept for the next call."""
    reader, frames = _pending.setdefault(fd, (FrameReader(), []))
    while not frames:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        frames.extend(reader.feed(chunk))
    return frames.pop(0)


def capped(out, err, cap):
    """A program's stdout and stderr within its output cap, stdout first."""
    return [bytes(out[:cap]), bytes(err[: max(0, cap - len(out))])]
