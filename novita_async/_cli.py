"""The ``novita-async`` command line: merge, batch, serve, demo, status.

Exit codes: 0 all ok, 1 some jobs failed, 2 usage or input error (a message,
no traceback), 130 interrupted (Ctrl-C, SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from novita_async._argtypes import number_arg
from novita_async._cli_batch import (
    check_ledger,
    check_output_folder,
    estimate_rows,
    make_folders,
    run_batch_command,
)
from novita_async._cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    in_cli_terms,
    say,
    signal_exit,
)
from novita_async._client import NovitaClient
from novita_async._config import API_KEY_ENV, BASE_URL_ENV, RESPONSE_IMAGE_TYPES, RetryPolicy, Timeout
from novita_async._errors import ConfigurationError, InvalidImageError, NovitaError, OutputError
from novita_async._fileio import FILE_IO_MODES
from novita_async._jobs import MergeJob, type_of_output
from novita_async._manifest import BadRow, ManifestError, check_manifest, jobs_from_folders
from novita_async._shard import default_ledger, parse_shard, shard_jobs, shard_rpm
from novita_async._version import __version__

__all__ = ["main"]

logger = logging.getLogger("novita_async")


#: argparse types for the numeric options: a bad value is refused naming the option,
#: before anything runs (the library's own check would name its Python parameter).
_AT_LEAST_ONE = number_arg(int, 1)
_POSITIVE = number_arg(float, 0, above=True)
_SECONDS = number_arg(float, 0)

def _add_client_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--base-url", help=f"API base URL (default: ${BASE_URL_ENV} or https://api.novita.ai)")
    group.add_argument("--api-key", help=f"API key (default: ${API_KEY_ENV}); keys start with sk_")
    group.add_argument("--concurrency", type=_AT_LEAST_ONE, default=8, metavar="N",
                       help="requests in flight at most (default: 8)")
    group.add_argument("--rpm", type=_POSITIVE, metavar="R",
                       help="requests per minute to pace at (default: adapt to the server's 429s)")
    group.add_argument("--timeout", type=_POSITIVE, default=180.0, metavar="S",
                       help="seconds allowed for one attempt (default: 180)")
    group.add_argument("--max-attempts", type=_AT_LEAST_ONE, metavar="N",
                       help="attempts per job, retries of transient errors included (default: 5 with "
                            "--rpm, 10 without: the adaptive pace finds the limit through 429s)")
    group.add_argument("--auto-resize", action="store_true",
                       help="downsize inputs over 2048x2048 (and convert CMYK/16-bit) instead of refusing them")
    group.add_argument("--file-io", choices=FILE_IO_MODES, default="auto",
                       help="where files are read and written: auto (on the event loop for fast local "
                            "folders, else worker threads) or threads (always worker threads)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="novita-async",
        description="Merge faces with Novita's Merge Face API, one at a time or in bulk.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbose_help = "log more (-v: retries and pacing, -vv: every request)"
    parser.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    # Also after the command (`batch ... -v`); SUPPRESS keeps a -v given before it.
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    merge = sub.add_parser("merge", parents=[verbosity], help="merge one face into one image",
                           description="Put the face from FACE onto the face in IMAGE.")
    merge.add_argument("face", metavar="FACE", help="image with the face to put in")
    merge.add_argument("image", metavar="IMAGE", help="image that receives the face")
    merge.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the result")
    merge.add_argument("--type", choices=RESPONSE_IMAGE_TYPES,
                       help="result format (default: from OUT's extension .png/.jpg/.jpeg/.webp, else png)")
    _add_client_options(merge)

    batch = sub.add_parser(
        "batch", parents=[verbosity], help="merge many pairs from a manifest or two folders",
        description="Run a batch: every job ends in the ledger as ok or failed; re-running resumes.",
    )
    batch.add_argument("manifest", nargs="?", metavar="MANIFEST",
                       help="CSV (face_image,image[,output][,id][,response_image_type]) or JSONL manifest")
    batch.add_argument("--faces", metavar="DIR", help="folder of face images (instead of a manifest)")
    batch.add_argument("--images", metavar="DIR", help="folder of target images (with --faces)")
    batch.add_argument("--pair", choices=("zip", "product"),
                       help="with folders: zip pairs 1st with 1st (default); product does every face on every image")
    batch.add_argument("-o", "--output-dir", required=True, metavar="OUT_DIR", help="folder for results")
    batch.add_argument("--type", choices=RESPONSE_IMAGE_TYPES, default="png", help="result format (default: png)")
    batch.add_argument("--ledger", metavar="FILE", help="ledger file (default: OUT_DIR/ledger.jsonl)")
    batch.add_argument("--ordered", action="store_true", help="report results in input order")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch.add_argument("--resend-no-face", action="store_true",
                       help="send again the jobs an earlier run (same ledger) found no face in, even "
                            "if their input files have not changed since (default: not sent again)")
    batch.add_argument("--grace", type=_SECONDS, default=60.0, metavar="S",
                       help="after Ctrl-C or SIGTERM, seconds to let in-flight jobs finish (default: 60)")
    batch.add_argument("--shard", type=_shard_arg, metavar="K/N",
                       help="do only shard K (0..N-1) of N: N workers given the same jobs and "
                            "K=0..N-1 do every job once; --rpm is then the account's total, each "
                            "worker pacing at rpm/N; ledger default OUT_DIR/ledger.shard-K-of-N.jsonl")
    batch.add_argument("--rpm-per-worker", type=_POSITIVE, metavar="R",
                       help="with --shard: pace this worker at R per minute instead of rpm/N")
    _add_client_options(batch)

    serve = sub.add_parser("serve", parents=[verbosity], help="run the local emulator of the API",
                           description="Serve a local emulator of the Merge Face API (offline).")
    from novita_async.emulator._cli import add_serve_options

    add_serve_options(serve)

    status = sub.add_parser(
        "status", parents=[verbosity], help="summarise a run from its ledgers (all shards at once)",
        description="One summary across ledgers: done, failed by reason, not attempted, and with "
                    "--manifest (or --faces and --images) the jobs left. Reads only; safe while workers run.",
    )
    status.add_argument("ledgers", nargs="+", metavar="LEDGER",
                        help="ledger files, or folders whose ledger*.jsonl files to read")
    status.add_argument("--manifest", metavar="FILE", help="the run's manifest, to count jobs left")
    status.add_argument("--faces", metavar="DIR", help="for a run over two folders: its face folder")
    status.add_argument("--images", metavar="DIR", help="for a run over two folders: its image folder")
    status.add_argument("--pair", choices=("zip", "product"), default="zip",
                        help="how that run paired the folders (default: zip)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    demo = sub.add_parser("demo", parents=[verbosity], help="run a batch against a local emulator, offline",
                          description="Start the emulator, make sample inputs, run a batch, write a contact sheet.")
    demo.add_argument("--jobs", type=_AT_LEAST_ONE, default=24, metavar="N", help="jobs to run (default: 24)")
    demo.add_argument("-o", "--output-dir", default="novita-demo", metavar="DIR",
                      help="where inputs, results, ledger and contact sheet go (default: ./novita-demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--concurrency", type=_AT_LEAST_ONE, default=4, metavar="N",
                      help="requests in flight (default: 4)")
    demo.add_argument("--latency", type=_SECONDS, default=0.3, metavar="S",
                      help="emulated server latency per merge (default: 0.3)")
    return parser


def _client_from_args(args: argparse.Namespace) -> NovitaClient:
    """The client the command's flags describe; a setting no request could use is a usage error."""
    try:
        client = NovitaClient(
            api_key=args.api_key, base_url=args.base_url,
            timeout=Timeout.of(args.timeout),
            retry=RetryPolicy(max_attempts=args.max_attempts) if args.max_attempts else None,
            max_concurrency=args.concurrency,
            requests_per_minute=args.rpm,
            auto_resize=args.auto_resize,
            file_io=args.file_io,
        )
    except (ConfigurationError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    _check_base_url_credentials(client, args.base_url)
    return client


def _merge_type(output: str, asked: str | None) -> str:
    """The result format: ``--type``, else OUT's extension, else png; a clash is a usage error."""
    implied = type_of_output(output)
    if asked is None:
        return implied or "png"
    if implied is not None and implied != asked:
        # A JPEG named .png (or the reverse) misleads every program that opens it.
        raise UsageError(f"-o {output} names a {implied} file but --type is {asked}: drop --type "
                         "(the format follows OUT's extension) or change the extension")
    return asked


def _folders_to_make(output: str) -> list[Path]:
    """The folders above ``output`` that do not exist yet, deepest first (blocking)."""
    missing: list[Path] = []
    folder = Path(output).absolute().parent
    try:
        while not folder.exists() and folder.parent != folder:
            missing.append(folder)
            folder = folder.parent
    except OSError:  # a part that cannot be looked at is none we can make
        pass
    return missing


def _remove_made_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty (blocking)."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue  # never made, or already gone: its parent may still be ours and empty
        except OSError:
            return  # not empty (someone else's files), or not ours to remove


def _check_merge_output(output: str) -> None:
    """Refuse an ``-o`` that names no file: empty, or ending in a path separator (a folder)."""
    if not output:
        raise UsageError("-o is empty: give the path of the result file, such as -o merged.png")
    if output.endswith(("/", os.sep)) or (os.altsep is not None and output.endswith(os.altsep)):
        # Path() drops the slash, which would write a file named after the folder.
        raise UsageError(f"-o {output} ends in a slash, so it names a folder, not a file: give the "
                         f"result a file name (such as -o {output}merged.png)")


def _check_base_url_credentials(client: NovitaClient, given: str | None) -> None:
    """Refuse a base URL holding ``user:password@``: it is never sent (the key is the only credential)."""
    parts = urlsplit(client.base_url)
    if parts.username is None and parts.password is None:
        return
    source = "--base-url" if given else f"${BASE_URL_ENV}"
    # The URL is not echoed: it holds a password.
    bare = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    raise UsageError(f"{source} holds a user name (user:password@ before the host), which is never "
                     f"sent: the API key is the only credential; give the URL without it, such as {bare}")


async def _merge_command(args: argparse.Namespace) -> int:
    _check_merge_output(args.output)
    image_type = _merge_type(args.output, args.type)
    client = _client_from_args(args)
    # The call makes -o's missing folders; a run that writes no result takes
    # them away again, rather than leave empty folders for every failed try.
    made = _folders_to_make(args.output)
    written = False
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    terminated = False

    def on_sigterm() -> None:
        # SIGTERM's default ends the process where it stands, leaving the
        # result's temporary file behind; cancelling lets the call clean up.
        nonlocal terminated
        terminated = True
        if task is not None:
            task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        async with client:
            try:
                result = await client.merge_face(args.face, args.image, response_image_type=image_type,
                                                 output=args.output)
                written = True
            except (InvalidImageError, OutputError, ConfigurationError) as exc:
                # The inputs, -o (a folder, an unwritable place) or the settings (a
                # .netrc entry aiohttp would send) are at fault: a usage or input error.
                raise UsageError(str(exc)) from None
            except NovitaError as exc:
                say(f"error: {type(exc).__name__}: {exc}")
                return EXIT_FAILED
    except asyncio.CancelledError:
        if not terminated:
            raise
        say("terminated: no result written")
        return signal_exit(signal.SIGTERM)
    finally:
        if not written:
            # Still under the SIGTERM handler: a second SIGTERM cannot cut this short.
            _remove_made_folders(made)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGTERM)
    say(f"wrote {result.path} ({result.image_type}, {result.attempts} attempt"
         f"{'s' if result.attempts != 1 else ''}, {result.elapsed:.2f} s)")
    return EXIT_OK


def _jobs_from_args(args: argparse.Namespace) -> Iterator[MergeJob | BadRow]:
    if args.manifest and (args.faces or args.images):
        raise UsageError("give either MANIFEST or --faces/--images, not both")
    if args.manifest and args.pair:
        raise UsageError("--pair pairs the files of --faces and --images; a manifest pairs its own rows")
    try:
        if args.manifest:
            return check_manifest(args.manifest)
        if args.faces and args.images:
            return iter(jobs_from_folders(args.faces, args.images, pair=args.pair or "zip",
                                          response_image_type=args.type))
    except (ManifestError, OSError) as exc:
        raise UsageError(str(exc)) from None
    raise UsageError("give a MANIFEST, or both --faces DIR and --images DIR")


async def _batch_command(args: argparse.Namespace) -> int:
    jobs = _jobs_from_args(args)
    output_dir = Path(args.output_dir)
    if args.shard is None and args.rpm_per_worker is not None:
        raise UsageError("--rpm-per-worker goes with --shard K/N; without it, use --rpm")
    ledger = Path(args.ledger) if args.ledger else default_ledger(output_dir, args.shard)
    # Found now, not after a run that could not start (and a summary of nothing).
    check_output_folder(output_dir)
    check_ledger(ledger, manifest=Path(args.manifest) if args.manifest else None)
    make_folders(output_dir, ledger)
    pacing = None
    if args.shard is not None:
        index, count = args.shard
        # Partition after ids are fixed (inside shard_jobs), so every worker agrees.
        jobs = shard_jobs(jobs, index, count)
        total_rpm = args.rpm
        args.rpm = args.rpm_per_worker if args.rpm_per_worker is not None else shard_rpm(args.rpm, count)
        if args.rpm is not None:
            pacing = (f"shard {index}/{count}: pacing at {args.rpm:g}/min"
                      + (f" (account total {total_rpm:g}/min)" if args.rpm_per_worker is None else ""))
    client = _client_from_args(args)
    if pacing is not None:  # said once the client took the settings
        say(pacing)
    async with client:
        code, _ = await run_batch_command(
            client, jobs, output_dir=output_dir, ledger=ledger, response_image_type=args.type,
            ordered=args.ordered, progress=False if args.no_progress else None, grace=args.grace,
            total=None if args.shard is not None else await anyio.to_thread.run_sync(estimate_rows, args.manifest),
            resend_no_face=args.resend_no_face,
        )
    return code


def _shard_arg(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _status_command(args: argparse.Namespace) -> int:
    from novita_async._status import run_status

    if bool(args.faces) != bool(args.images):
        raise UsageError("give both --faces DIR and --images DIR, as the batch had them")
    if args.manifest and args.faces:
        raise UsageError("give either --manifest or --faces/--images, not both")
    try:
        jobs = jobs_from_folders(args.faces, args.images, pair=args.pair) if args.faces else None
        status = run_status(args.ledgers, manifest=args.manifest, jobs=jobs)
    except (ManifestError, OSError) as exc:
        raise UsageError(str(exc)) from None
    for path, counts in status.ledgers:
        if counts is not None and counts.recorded == 0 and path.stat().st_size > 0:
            # Lines, but not one job record: the manifest given in the ledger's place, say.
            raise UsageError(f"{path} holds no ledger records: give the ledger a batch wrote "
                             "(OUT_DIR/ledger.jsonl by default), and a manifest with --manifest")
    if jobs is None and args.manifest is None and all(counts is None for _, counts in status.ledgers):
        # A missing file is a shard not started yet; with none at all and no
        # job list to count against, the table would say nothing but "0", and
        # a mistyped path would pass for a run that did nothing.
        named = ", ".join(str(path) for path in args.ledgers)
        raise UsageError(f"no ledger found at {named}: give the ledger file a batch wrote "
                         "(OUT_DIR/ledger.jsonl by default) or its output folder; before a run "
                         "starts, add --manifest to see the jobs it has left")
    if args.json:
        sys.stdout.write(json.dumps(status.as_dict(), indent=2) + "\n")
        return EXIT_OK
    if args.faces:
        status = dataclasses.replace(status, source="folders")
    sys.stdout.write(status.table() + "\n")
    return EXIT_OK


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _glue_negative_shard(argv: Sequence[str]) -> list[str]:
    """``--shard -1/3`` as ``--shard=-1/3``.

    argparse takes ``-1/3`` for an option and says only "expected one argument";
    glued, the value reaches ``--shard``'s own check, which says what is wrong.
    """
    glued = list(argv)
    index = 0
    while index < len(glued) - 1 and glued[index] != "--":
        if glued[index] == "--shard" and re.fullmatch(r"-\d+/.*", glued[index + 1]):
            glued[index : index + 2] = [f"--shard={glued[index + 1]}"]
        index += 1
    return glued


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``novita-async``; returns the exit code."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        # Wherever Ctrl-C lands, parsing the command line included (building
        # the parser imports the emulator): one line, and the shell's 130.
        sys.stderr.write("novita-async: interrupted\n")
        return EXIT_INTERRUPTED


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(_glue_negative_shard(sys.argv[1:] if argv is None else argv))
    _configure_logging(args.verbose)
    try:
        if args.command == "merge":
            return asyncio.run(_merge_command(args))
        if args.command == "batch":
            return asyncio.run(_batch_command(args))
        if args.command == "serve":
            from novita_async.emulator._cli import serve_command

            return serve_command(args)
        if args.command == "status":
            return _status_command(args)
        if args.command == "demo":
            from novita_async._demo import demo_command

            return asyncio.run(demo_command(args))
    except UsageError as exc:
        sys.stderr.write(f"novita-async: error: {in_cli_terms(str(exc))}\n")
        return EXIT_USAGE
    parser.error(f"unknown command {args.command!r}")  # exits with 2


def entry() -> None:
    """Console-script wrapper: exit with ``main()``'s code."""
    sys.exit(main())
