"""``ckpt status [--socket PATH] [--json]``: what the local daemon holds.

Prints one row per segment (job, rank, generation, owner and whether it is alive, the
sealed steps per slot, size, last persisted step, persist queue, errors). Exit status 0,
or 1 with a message saying how to start a daemon when none answers.
"""

from __future__ import annotations

import argparse
import json
import sys

from google.protobuf.json_format import MessageToDict

from ckpt.control.client import DaemonClient
from ckpt.control.paths import default_socket_path
from ckpt.errors import CkptError


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def format_table(reply) -> str:
    """A plain-text table of a StatusReply."""
    lines = [f"ckpt daemon pid {reply.pid}, version {reply.version}, up "
             f"{reply.uptime_s:.0f} s, socket {reply.socket_path}"]
    header = ("JOB", "RANK", "GEN", "OWNER", "SLOT STEPS", "SIZE", "PERSISTED", "QUEUE",
              "ERRORS")
    rows = []
    for s in reply.segments:
        slots = ", ".join(f"{x.slot}:{x.step}" for x in sorted(s.slots, key=lambda x: x.slot))
        owner = f"{s.owner_pid} ({'alive' if s.owner_alive else 'dead'})"
        persisted = "-" if s.last_persisted_step < 0 else str(s.last_persisted_step)
        flags = " released" if s.released else ""
        rows.append((s.job + flags, str(s.rank), str(s.generation), owner, slots or "-",
                     _size(s.size_bytes), persisted, str(s.persist_queue),
                     str(len(s.errors))))
    if not rows:
        lines.append("no segments")
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for s in reply.segments:
        for e in s.errors:
            lines.append(f"{s.job} rank {s.rank}: {e}")
    for e in reply.errors:
        lines.append(f"daemon: {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ckpt status", description="What the local daemon holds.")
    p.add_argument("--socket", default=None, help="daemon socket (default: the standard path)")
    p.add_argument("--json", action="store_true", help="print the StatusReply as JSON")
    p.add_argument("--timeout-s", type=float, default=5.0)
    args = p.parse_args(argv)
    socket_path = args.socket or str(default_socket_path())
    try:
        with DaemonClient(socket_path, timeout_s=args.timeout_s) as client:
            reply = client.status()
    except CkptError as e:
        print(f"ckpt status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=2))
    else:
        print(format_table(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
