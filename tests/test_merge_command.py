"""`novita-async merge`: an -o or a base URL that cannot work is a usage error (exit 2) in the CLI's terms."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from novita_async._cli import main
from novita_async.emulator import EmulatorConfig

from .batch_support import ThreadedEmulator, write_inputs


@pytest.fixture
def emu() -> Iterator[ThreadedEmulator]:
    """An emulator serving from its own thread (main() runs its own event loop)."""
    with ThreadedEmulator(EmulatorConfig(engine="composite")) as server:
        yield server


def merge(capsys: pytest.CaptureFixture[str], tmp_path: Path, output: object, *options: str) -> tuple[int, str]:
    """`merge FACE IMAGE -o OUTPUT OPTIONS` in-process: (exit code, stderr)."""
    [(face, image)] = write_inputs(tmp_path, 1)
    code = main(["merge", str(face), str(image), "-o", str(output), *options])
    return code, capsys.readouterr().err


def test_an_empty_output_is_a_usage_error(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o ""` exits 2 naming -o and a fix a CLI user can apply (not `output=None`); nothing sent."""
    code, err = merge(capsys, tmp_path, "", "--base-url", emu.url, "--api-key", emu.api_key)
    assert code == 2
    assert err.startswith("novita-async: error: -o is empty:")
    assert "-o merged.png" in err and "output=None" not in err
    assert emu.stats.requests == 0


@pytest.mark.parametrize("from_env", [pytest.param(False, id="flag"), pytest.param(True, id="env")])
def test_a_base_url_with_credentials_is_a_usage_error(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, from_env: bool,
) -> None:
    """A base URL with user:password@ exits 2 naming where it came from and the fix, without the password."""
    url = emu.url.replace("http://", "http://user:s3cret@")
    if from_env:
        monkeypatch.setenv("NOVITA_BASE_URL", url)
        options = ["--api-key", emu.api_key]
    else:
        options = ["--base-url", url, "--api-key", emu.api_key]
    code, err = merge(capsys, tmp_path, tmp_path / "out.png", *options)
    assert code == 2
    source = "$NOVITA_BASE_URL" if from_env else "--base-url"
    assert err.startswith(f"novita-async: error: {source} holds a user name")
    assert f"give the URL without it, such as {emu.url}" in err
    assert "s3cret" not in err
    assert emu.stats.requests == 0
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("depth", [pytest.param("newdir/", id="new-folder"),
                                   pytest.param("a/b/", id="new-nested-folders")])
def test_an_output_ending_in_a_slash_is_refused_like_an_existing_folder(
    emu: ThreadedEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], depth: str
) -> None:
    """`-o newdir/` (a folder not there yet) exits 2 with a file-name fix, as for an existing folder;
    it writes no file named newdir, makes no folder and sends nothing."""
    output = f"{tmp_path}/{depth}"
    code, err = merge(capsys, tmp_path, output, "--base-url", emu.url, "--api-key", emu.api_key)
    assert code == 2
    assert f"-o {output} ends in a slash, so it names a folder, not a file" in err
    assert f"-o {output}merged.png" in err
    assert not Path(output).exists()
    assert not (tmp_path / depth.split("/")[0]).exists()
    assert emu.stats.requests == 0
