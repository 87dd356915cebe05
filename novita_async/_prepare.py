"""A call's inputs, made ready to send: opened, checked before upload, and resized if asked.

The checks (stat, header, structure) of both inputs run in one file call,
on the event loop or in a worker thread as the client's file-call policy
says (``_fileio``); an image that breaks a rule ``auto_resize`` can repair is
re-encoded in a worker thread instead of refused.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import anyio.to_thread

from novita_async._errors import InvalidImageError
from novita_async._file_objects import at_its_end
from novita_async._fileio import FileCalls, Handover, folder_of
from novita_async._output import existing_kind, not_a_file_error
from novita_async._sources import ImageSource, _source_sync, buffer_source, close_sources

__all__ = ["prepare_inputs"]

logger = logging.getLogger("novita_async")

#: Rules that ``auto_resize`` can repair by re-encoding the image.
_RESIZABLE_RULES = frozenset({"max_resolution", "max_size", "color_mode"})


def _path_folders(inputs: tuple[tuple[object, str], ...], output: Path | None) -> tuple[str, ...] | None:
    """The folders a job's inputs and output are in; None if an input is not a path.

    Only paths can be checked on the event loop: a PIL image is encoded (long,
    CPU-bound work) and a file object may be anything, a socket included.
    """
    folders: list[str] = []
    for value, _ in inputs:
        if not isinstance(value, (str, os.PathLike)):
            return None
        if "\0" in os.fsdecode(os.fspath(value)):
            # No folder has that name (looking one up raises ValueError): the
            # check, in a worker thread, refuses the path and names the input.
            return None
        folders.append(folder_of(value))
    if output is not None:
        folders.append(folder_of(output))
    return tuple(dict.fromkeys(folders))


async def prepare_inputs(
    inputs: tuple[tuple[object, str], ...], *, files: FileCalls, validate: bool, auto_resize: bool,
    output: Path | None = None,
) -> list[ImageSource]:
    """A source per ``(value, input_name)``, opened and checked (stat and header) in one file call.

    That call runs where ``files`` runs file calls for these folders (on
    the event loop or in a worker thread, see ``_fileio``); inputs that are
    not paths always go to a worker thread.  Opening reads a small file
    whole or keeps a large one open, for the first upload, with or without
    the checks (``validate``).  The same call checks that ``output`` is not
    an existing folder, device, pipe or link: found out after the request,
    that would be a paid result with nowhere to go (or one put in the place
    of ``/dev/null``).

    ``auto_resize`` resizes an image too large (or converts one in a colour
    mode the API refuses) even with ``validate=False``: it was asked for, and
    reading the header is how to tell.  Without ``validate``, an input that
    breaks any other rule is sent as it is, for the API to judge.
    """
    from novita_async import _images  # Pillow, imported on the first call rather than with the package

    # auto_resize needs each image's header to know whether to resize it, so
    # asking for it (per call, even with validate=False) runs the checks too.
    read_headers = validate or auto_resize

    def open_and_check(value: object, input_name: str) -> tuple[ImageSource, InvalidImageError | None]:
        source = _source_sync(value, input_name, files)
        try:
            with source.open_sync() as stream:
                if read_headers:
                    _images.check_image(stream, size=source.size, input_name=input_name,
                                        source=source.description)
        except InvalidImageError as exc:
            return source, at_its_end(source, exc)
        except BaseException:
            source.close()
            raise
        return source, None

    def check_all() -> tuple[list[tuple[ImageSource, InvalidImageError | None]], str | None]:
        # One call for every input's stat and header check: where it is a
        # thread hop, each hop costs ~65 us of CPU and several wake-ups on
        # a busy machine.
        checked: list[tuple[ImageSource, InvalidImageError | None]] = []
        try:
            for value, input_name in inputs:
                checked.append(open_and_check(value, input_name))
        except BaseException:
            close_sources(source for source, _ in checked)
            raise
        return checked, existing_kind(output) if output is not None else None

    # A caller cancelled while the check runs in a worker thread would drop the
    # sources it returns, with their files open: the handover closes them.
    check = Handover(check_all, lambda result: close_sources(source for source, _ in result[0]))
    folders = _path_folders(inputs, output)
    if folders is None:  # a PIL image to encode, or a file object of unknown kind
        checked, output_kind = await check.run_in(anyio.to_thread.run_sync)
    else:
        checked, output_kind = await check.run_in(partial(files.run, folders))
    sources: list[ImageSource] = []
    try:
        for source, problem in checked:
            resizable = problem is not None and auto_resize and problem.rule in _RESIZABLE_RULES
            if problem is None or not (validate or resizable):
                # validate=False: checked only to resize; other problems are the API's to judge.
                sources.append(source)
                continue
            source.close()
            if not resizable:
                raise problem

            def fit(source: ImageSource = source) -> bytes:
                try:
                    with source.open_sync() as stream:
                        data, _ = _images.fit_image(stream, input_name=source.input_name,
                                                    source=source.description)
                finally:
                    source.close()
                return data

            data = await anyio.to_thread.run_sync(fit)
            logger.info("%s (%s) resized to fit the API's limits (%s)", source.input_name,
                        source.description, problem.rule)
            sources.append(buffer_source(data, source.input_name, f"{source.description} (resized)"))
        if output is not None and output_kind is not None:
            raise not_a_file_error(output, output_kind)
    except BaseException:
        close_sources(source for source, _ in checked)
        raise
    return sources
