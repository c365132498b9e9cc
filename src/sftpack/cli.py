"""The `sftpack` command line: parsing and printing only; the library does the work."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError, SFTPackError


def _fields(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, key = pair.partition("=")
        if not sep or not name or not key:
            raise ConfigError(f"--field takes NAME=KEY (for example prompt=question), got {pair!r}")
        out[name] = key
    return out


def _not_json(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _template_args(pairs: Sequence[str]) -> dict[str, Any]:
    """--template-arg NAME=VALUE: the value as JSON where it parses (false, 3, ["a"]), else the text."""
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--template-arg takes NAME=VALUE (for example enable_thinking=false), got {pair!r}")
        try:
            out[name] = json.loads(text, parse_constant=_not_json)  # (NaN, Infinity: text)
        except ValueError:
            out[name] = text
    return out


def _parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the command; SUPPRESS keeps one from resetting the other
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="on an error, show the Python traceback"
    )
    p = argparse.ArgumentParser(
        prog="sftpack", description="Pack SFT data into fixed-length training sequences.", parents=[debug]
    )
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build (or reuse) a packed store", parents=[debug])
    b.add_argument("inputs", nargs="+", help="input files, directories or globs (.jsonl[.gz|.zst], .json, .parquet)")
    b.add_argument("--out", required=True, help="store directory to write")
    b.add_argument("--tokenizer", default="llama3", help="bundled name, HF tokenizer directory or tokenizer.json")
    _option_flags(b, groups=("plan", "store", "view", "run"))
    b.add_argument(
        "--workers", type=int, default=0, help="cores to use, as tokenizer threads or build processes (0: all)"
    )
    b.add_argument("--force", action="store_true", help="rebuild even if the store is up to date")
    b.add_argument("--quiet", action="store_true", help="no progress bar, no summary (warnings are still shown)")

    st = sub.add_parser(
        "stats", help="plan a store and report: rows, efficiency, losses, document lengths", parents=[debug]
    )
    st.add_argument("store")
    _option_flags(st, groups=("plan",), recorded=True)
    st.add_argument("--plot", metavar="FILE.png", help="also draw the length histogram and row fill (matplotlib)")

    v = sub.add_parser("verify", help="check every checksum of a store", parents=[debug])
    v.add_argument("store")

    i = sub.add_parser("inspect", help="print a row decoded, with boundaries and masked tokens marked", parents=[debug])
    i.add_argument("store")
    i.add_argument("--row", type=int, default=0)
    i.add_argument("--tokenizer", default=None, help="override the tokenizer recorded in the store")
    i.add_argument("--color", choices=("auto", "always", "never"), default="auto")

    c = sub.add_parser(
        "check-isolation",
        help="prove packed rows give the same per-token loss as documents run alone (tiny random Llama)",
        parents=[debug],
    )
    c.add_argument("store")
    c.add_argument("--rows", type=int, default=4, help="rows to check: those holding the most documents (default 4)")
    c.add_argument("--seed", type=int, default=0, help="seed of the tiny random Llama's weights")
    c.add_argument("--atol", type=float, default=1e-4, help="largest per-token loss difference allowed")
    c.add_argument(
        "--padding-free",
        action="store_true",
        help="batch the rows padding-free (sftpack.hf.DataCollator(padding_free=True)) instead of (B, L)",
    )
    return p


def _option_flags(
    p: argparse.ArgumentParser, groups: tuple[str, ...] = ("plan", "store", "view"), recorded: bool = False
) -> None:
    """One flag per `BuildOptions` field (the single list of options). `recorded`: every
    default is None, meaning "as recorded in the store"."""
    from .config import option_fields

    for f in option_fields():
        if f.metadata["group"] not in groups:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if f.name in ("fields", "template_args"):
            kw.update(action="append", default=[], metavar="NAME=KEY" if f.name == "fields" else "NAME=VALUE")
        elif f.type.startswith("bool"):
            kw.update(
                action="store_false" if flag.startswith("--no-") else "store_true",
                default=None if recorded or f.default is None else f.default,
            )
        else:
            kw.update(
                type=int if f.type.startswith("int") else str,
                choices=f.metadata["choices"] or None,
                default=None if recorded else f.default,
                required=f.name == "seq_length" and not recorded,
            )
        p.add_argument(flag, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Every failure is one line on stderr and exit status 1 (2: a usage
    error, from argparse; 130: interrupted); `--debug` shows the traceback instead."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return _main(argv, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None, debug: bool) -> int:
    try:
        args = _parser().parse_args(argv)
        code = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled
        return code
    except BrokenPipeError:
        # the reader went away (`sftpack inspect ... | head -1`): stop quietly, and point stdout
        # at devnull so that the interpreter's final flush does not complain (Python's recipe)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except _Terminated:
        print("sftpack: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if debug:
            raise
        print("sftpack: interrupted", file=sys.stderr)
        return 130
    except SFTPackError as exc:
        if debug:
            raise
        _error(str(exc))
        return 1
    except OSError as exc:  # a full disk, a permission: the system's words and the path say it all
        if debug:
            raise
        _error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else f"{exc.strerror or exc}")
        return 1
    except Exception as exc:
        if debug:
            raise
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        _error(f"{what} (unexpected; rerun with --debug for the traceback)")
        return 1


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, a job scheduler): unwinds like Ctrl-C, so nothing is left behind."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _error(message: str) -> None:
    print("sftpack: error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()), file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        return _build(args)
    if args.command == "stats":
        return _stats(args)
    if args.command == "verify":
        from .store import verify_store

        store = verify_store(args.store)
        print(f"ok: {store.path} ({len(store.tokens):,} tokens, every checksum matches)")
        return 0
    if args.command == "inspect":
        from .inspect import render_row

        print(render_row(args.store, args.row, tokenizer=args.tokenizer, color=args.color))
        return 0
    if args.command == "check-isolation":
        from .isolation import check_isolation

        report = check_isolation(
            args.store, rows=args.rows, seed=args.seed, atol=args.atol, padding_free=args.padding_free
        )
        print("\n".join(report.lines()))
        return 0 if report.passed else 1
    return 1


def _build(args: argparse.Namespace) -> int:
    from .build import build
    from .config import BuildOptions, option_fields

    values = {f.name: getattr(args, f.name) for f in option_fields()}
    options = BuildOptions(
        **{**values, "fields": _fields(args.fields), "template_args": _template_args(args.template_args)}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = build(
            args.inputs,
            args.out,
            options,
            args.tokenizer,
            workers=args.workers,
            progress=False if args.quiet else None,
            force=args.force,
        )
    if not args.quiet:
        from .report import report_lines
        from .store import open_store
        from .view import View

        print("\n".join(summary.lines()))
        view = View(open_store(summary.path), options)  # for the lengths: the summary holds the plan's counts
        report = report_lines(summary.plan, view.lengths)  # type: ignore[arg-type]
        at = next((i for i, line in enumerate(report) if "document lengths" in line), len(report))
        print("\n".join(report[at:]))  # the summary above has the rest of the report
    for line in _warnings(summary, caught, args):
        print(f"sftpack: warning: {line}", file=sys.stderr)
    return 0


def _warnings(summary: Any, caught: list[warnings.WarningMessage], args: argparse.Namespace) -> list[str]:
    """Warnings for stderr: the summary's WARNING lines when --quiet hides the summary (from its
    counts, so a reused store warns too), and any warning the summary does not hold, once."""
    out = [w.removeprefix("WARNING: ") for w in summary.warnings()] if args.quiet else []
    out.extend(str(w.message) for w in caught if "special-token strings" not in str(w.message))
    return list(dict.fromkeys(out))


def _stats(args: argparse.Namespace) -> int:
    from .config import option_fields
    from .report import plot, report_lines, row_fill
    from .store import open_store
    from .view import View, options_for

    store = open_store(args.store)
    options = options_for(store, **{f.name: getattr(args, f.name) for f in option_fields("plan")})
    view = View(store, options, count_supervised=True)
    pad = view.pad if options.packing == "bfd" else None
    labels = (view.supervision()[0], int(store.manifest["counts"]["supervised_tokens"]))
    print("\n".join(report_lines(view.plan.stats, view.lengths, pad=pad, labels=labels)))
    if args.plot:
        print(f"plot: {plot(view.plan.stats, view.lengths, row_fill(view.plan), args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
