"""``novita-async serve``: the emulator as a command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys

from novita_async._argtypes import number_arg
from novita_async._config import Timeout
from novita_async.emulator._config import DEFAULT_API_KEY, FAULT_KINDS, IMAGE_LIMITS, EmulatorConfig, Faults
from novita_async.emulator._server import Emulator

__all__ = ["add_serve_options", "config_from_args", "serve_command"]


def _fault(text: str) -> tuple[str, float]:
    kind, sep, rate = text.partition("=")
    if not sep or kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use KIND=RATE with KIND one of {', '.join(FAULT_KINDS)}")
    try:
        return kind, float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: RATE must be a number between 0 and 1") from None


_SECONDS = number_arg(float, 0)
_COUNT = number_arg(int, 0)
_MIB = 1024 * 1024


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``serve`` (also used by benchmarks that start the emulator)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=number_arg(int, 0, maximum=65535), default=8787,
                        help="TCP port; 0 picks a free one (default: 8787)")
    parser.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                        help=f"a key to accept (repeatable; default: {DEFAULT_API_KEY})")
    parser.add_argument("--latency", type=_SECONDS, default=0.0, metavar="S", help="seconds added to each merge")
    parser.add_argument("--jitter", type=_SECONDS, default=0.0, metavar="S",
                        help="up to this many seconds more, at random")
    parser.add_argument("--fault", type=_fault, action="append", default=[], metavar="KIND=RATE",
                        help=f"inject a fault on this share of attempts; kinds: {', '.join(FAULT_KINDS)}")
    parser.add_argument("--fail-first", type=_COUNT, default=0, metavar="N",
                        help="fail the first N attempts of each job")
    parser.add_argument("--seed", type=int, help="seed for the fault dice")
    parser.add_argument("--slow-seconds", type=_SECONDS, default=Faults.slow_seconds, metavar="S",
                        help=f"how long a 'slow' fault takes before its 500 (default: {Faults.slow_seconds:g}, "
                             f"longer than the client's default {Timeout.total:g} s timeout)")
    parser.add_argument("--drip-interval", type=_SECONDS, default=Faults.drip_interval, metavar="S",
                        help=f"seconds between the bytes of a 'drip' answer (default: {Faults.drip_interval:g}, "
                             f"longer than the client's default {Timeout.read:g} s read timeout; 0 sends it at once)")
    parser.add_argument("--rpm", type=number_arg(float, 0, above=True), metavar="R",
                        help="per-key rate limit in requests per minute")
    parser.add_argument("--burst", type=number_arg(int, 1), default=3, metavar="N",
                        help="requests allowed at once under --rpm")
    parser.add_argument("--rate-limit-kind", choices=("bucket", "window"), default="bucket",
                        help="how --rpm is kept: a token bucket with --burst (default), or at most R "
                             "requests in any sliding minute")
    parser.add_argument("--retry-after", action="store_true", help="send Retry-After with rate-limit 429s")
    parser.add_argument("--engine", choices=("auto", "face", "composite"), default="auto",
                        help="merge step: the real face merge ([local] extra) or a simple composite")
    parser.add_argument("--workers", type=number_arg(int, 1), default=2, metavar="N",
                        help="merges run at once (default: 2)")
    parser.add_argument("--balance", type=_COUNT, metavar="N",
                        help="successful merges before BILLING_BALANCE_NOT_ENOUGH")
    parser.add_argument("--png-level", type=int, default=1, choices=range(10), metavar="0-9",
                        help="zlib level of PNG results; 0 stores them uncompressed (default: 1)")
    parser.add_argument("--size-limit-unit", choices=tuple(IMAGE_LIMITS), default="mib",
                        help="how the API's 30 MB per image is read, as its docs do not say: mib "
                             f"({IMAGE_LIMITS['mib']:,} bytes, the client's reading; default) or mb "
                             f"({IMAGE_LIMITS['mb']:,} bytes)")
    parser.add_argument("--keepalive-timeout", type=number_arg(float, 0, above=True), default=75.0, metavar="S",
                        help="seconds before an idle keep-alive connection is closed (default: 75)")
    parser.add_argument("--max-body-held-mib", type=number_arg(float, 0, above=True), default=512.0, metavar="M",
                        help="MiB of request bodies held at once; more uploads wait, unread (default: 512)")
    parser.add_argument("--body-read-timeout", type=number_arg(float, 0, above=True), default=60.0, metavar="S",
                        help="seconds a request body may take to arrive before the connection is closed "
                             "(default: 60)")


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """Build the emulator's config from parsed ``serve`` options."""
    faults = Faults(rates=dict(args.fault), fail_first=args.fail_first, seed=args.seed,
                    slow_seconds=args.slow_seconds, drip_interval=args.drip_interval)
    return EmulatorConfig(
        api_keys=tuple(args.api_keys or (DEFAULT_API_KEY,)), latency=args.latency, jitter=args.jitter,
        faults=faults, rate_limit_rpm=args.rpm, rate_limit_burst=args.burst,
        rate_limit_kind=args.rate_limit_kind,
        rate_limit_retry_after=args.retry_after, merge_workers=args.workers, engine=args.engine,
        balance=args.balance, png_level=args.png_level, keepalive_timeout=args.keepalive_timeout,
        max_image_bytes=IMAGE_LIMITS[args.size_limit_unit],
        # At least a byte: a tiny fraction of a MiB must not round to an invalid 0.
        max_body_bytes_held=max(1, int(args.max_body_held_mib * _MIB)),
        body_read_timeout=args.body_read_timeout,
    )


async def _serve(config: EmulatorConfig, host: str, port: int) -> int:
    emulator = Emulator(config, host=host, port=port)
    try:
        await emulator.start()
    except OSError as exc:  # the port is taken, the host is not this machine's...
        sys.stderr.write(f"novita-async serve: error: {_bind_problem(exc, host, port)}\n")
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    engine = emulator.engine
    note = "" if engine.startswith("face") else (
        "  (a simple composite, not a face merge: install the [local] extra for the real one)")
    # The URL line comes first and alone so scripts can read it.
    sys.stdout.write(f"{emulator.url}\n")
    sys.stdout.flush()
    sys.stderr.write(f"novita-async emulator on {emulator.url}  key: {emulator.api_key}\n"
                     f"merge engine: {engine}{note}\nCtrl-C to stop\n")
    try:
        await stop.wait()
    finally:
        await emulator.stop()
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """Run the emulator until Ctrl-C; returns the exit code."""
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"warning: binding {args.host}: the emulator is reachable beyond this machine\n")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        sys.stderr.write(f"novita-async serve: error: {exc}\n")
        return 2
    # -vv is for the emulator's line per request; Pillow's debug lines (one per
    # PNG chunk it reads) would bury them.
    logging.getLogger("PIL").setLevel(logging.INFO)
    return asyncio.run(_serve(config, args.host, args.port))


def _bind_problem(exc: OSError, host: str, port: int) -> str:
    """What went wrong binding ``host:port``, and what to do about it, in a line."""
    if isinstance(exc, socket.gaierror):
        return f"--host {host} is not an address or a name that resolves ({exc.strerror})"
    code = exc.errno
    # Python 3.13's asyncio skips each address it cannot assign (EADDRNOTAVAIL),
    # and when none is left raises this OSError, which has no errno.
    if code is None and str(exc).startswith("could not bind on any address"):
        code = errno.EADDRNOTAVAIL
    if code == errno.EADDRINUSE:
        return f"port {port} is in use on {host}: pick another with --port, or --port 0 for a free one"
    if code == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine: give one of its own, such as 127.0.0.1"
    if code == errno.EACCES:
        return f"no permission to bind port {port}: pick one above 1023, or --port 0 for a free one"
    return f"cannot listen on {host} port {port}: {exc.strerror or exc}"
