"""The ``ckpt`` command: ls | inspect | verify read checkpoints; daemon | status | demo dispatch.

Exit codes: 0 success; 1 a checkpoint is damaged or an operation failed;
2 usage error (bad arguments, a path that does not exist). Errors are one
line ``ckpt: error: ...`` on stderr, never a traceback for a CkptError.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ckpt.errors import CkptError

if TYPE_CHECKING:
    from ckpt.storage.fs import StepInfo

# subcommand -> (module, help); each module has main(argv) -> int, written by its owner
_DISPATCH = {
    "daemon": ("ckpt.daemon.server", "run the per-node snapshot daemon"),
    "status": ("ckpt.daemon.status_cli", "show what the local daemon holds"),
    "demo": ("ckpt.cli.demo", "train a tiny model, SIGKILL it, resume bit-exactly"),
}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input: exit 2."""


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def _human_age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _print_table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _resolve_step(path_arg: str) -> Path:
    """A step dir as given, or the newest committed step when given a checkpoint DIR."""
    from ckpt.storage.fs import FsStorage, parse_step_dirname

    path = Path(path_arg)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory")
    if parse_step_dirname(path.name) is not None or (path / "manifest.json").exists():
        return path
    steps = [s for s in FsStorage(path).list_steps() if not s.staging]
    if not steps:
        raise UsageError(
            f"{path} holds no step-XXXXXXXX directories; pass DIR or DIR/step-XXXXXXXX")
    return steps[-1].path


def cmd_ls(args: argparse.Namespace) -> int:
    from ckpt.storage.fs import FsStorage

    root = Path(args.dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    steps = FsStorage(root).list_steps()
    now = time.time()
    if args.json:
        print(json.dumps([{"step": s.step, "path": str(s.path), "complete": s.complete,
                           "staging": s.staging, "size_bytes": s.size_bytes,
                           "world_size": s.world_size, "mtime_unix_s": s.mtime_unix_s,
                           "problem": s.problem}
                          for s in steps]))
        return EXIT_OK
    if not steps:
        print(f"no checkpoint steps in {root}")
        return EXIT_OK
    rows = [(str(s.step), _step_status(s), _human_bytes(s.size_bytes),
             "?" if s.world_size is None else str(s.world_size),
             _human_age(now - s.mtime_unix_s) if s.mtime_unix_s else "?", s.path.name)
            for s in steps]
    _print_table(("step", "status", "size", "world", "age", "dir"), rows)
    for s in steps:
        if s.problem is not None:
            print(f"DAMAGED {s.problem}", file=sys.stderr)
    return EXIT_OK


def _step_status(info: StepInfo) -> str:
    if info.complete:
        return "complete"
    if info.staging:
        return "staging"
    return "DAMAGED" if info.problem is not None else "INCOMPLETE"


def cmd_inspect(args: argparse.Namespace) -> int:
    from ckpt.format.reader import StepReader

    path = _resolve_step(args.path)
    with StepReader(path) as reader:
        by_name: dict[str, list] = {}
        for piece in reader.tensors():
            by_name.setdefault(piece.name, []).append(piece)
        entries = []
        for name, pieces in by_name.items():
            raw = sum(p.raw_bytes for p in pieces)
            stored = sum(p.stored_bytes for p in pieces)
            entries.append({"name": name, "dtype": pieces[0].dtype,
                            "global_shape": list(pieces[0].global_shape), "pieces": len(pieces),
                            "ranks": sorted({p.rank for p in pieces}), "raw_bytes": raw,
                            "stored_bytes": stored,
                            "compression_ratio": round(raw / stored, 3) if stored else 1.0})
        if args.json:
            print(json.dumps({"path": str(path), "step": reader.step,
                              "world_size": reader.world_size, "tensors": entries}))
            return EXIT_OK
        print(f"{path}: step {reader.step}, world size {reader.world_size}, "
              f"{len(entries)} tensors")
        _print_table(("name", "dtype", "global shape", "pieces", "bytes", "ratio"),
                     [(e["name"], e["dtype"], "x".join(map(str, e["global_shape"])) or "()",
                       str(e["pieces"]), _human_bytes(e["raw_bytes"]),
                       f"{e['compression_ratio']:.2f}") for e in entries])
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from ckpt.format.verify import TABLE_DAMAGE, verify
    from ckpt.progress import byte_progress

    path = _resolve_step(args.path)
    with byte_progress(f"verify {path.name}", enabled=not args.quiet) as progress:
        report = verify(path, progress=progress)
    for d in report.damage:
        if d.chunk_index == TABLE_DAMAGE:  # the message names the file
            print(f"DAMAGED {d.message}", file=sys.stderr)
        else:
            print(f"DAMAGED {d.file} tensor {d.tensor!r} chunk {d.chunk_index}: {d.message}",
                  file=sys.stderr)
    status = "ok" if report.ok else f"DAMAGED ({len(report.damage)} problems)"
    print(f"{path}: step {report.step}, {report.chunks_checked} chunks, "
          f"{_human_bytes(report.raw_bytes_checked)} checked: {status}")
    return EXIT_OK if report.ok else EXIT_FAILED


def _dispatch(name: str, argv: list[str]) -> int:
    module_name = _DISPATCH[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            print(f"ckpt: error: 'ckpt {name}' is not available in this installation "
                  f"({module_name} is missing)", file=sys.stderr)
            return EXIT_FAILED
        raise
    return int(module.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt", description="Fault-tolerant checkpoints for "
                                     "PyTorch: inspect and check checkpoints, run the daemon.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("ls", help="list the steps of a checkpoint directory")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("inspect", help="tensor table of a step (DIR/step-XXXXXXXX or DIR: newest)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("verify", help="check every chunk's crc32c (DIR: the newest step)")
    p.add_argument("path")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)
    for name, (_, help_text) in _DISPATCH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ckpt`` command; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] in _DISPATCH:
            return _dispatch(args_list[0], args_list[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(args_list)
        except SystemExit as exc:  # argparse printed usage; --help exits 0
            return int(exc.code or 0)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.func(args)
    except UsageError as exc:
        print(f"ckpt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CkptError as exc:
        print(f"ckpt: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_FAILED
    except OSError as exc:  # permissions, I/O errors: the message names the file
        print(f"ckpt: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("ckpt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the promise: one line, never a traceback
        print(f"ckpt: error: unexpected {type(exc).__name__}: {exc} (a checkpoint file may be "
              f"damaged in a way ckpt does not check yet; please report it)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
