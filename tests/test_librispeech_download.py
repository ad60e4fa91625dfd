"""LibriSpeech download: checksum, resume (Range), extraction safety, CLI; against a local HTTP server."""
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.prepare import librispeech
from reverse_voicefilter.prepare.librispeech import DownloadError

SUBSET = "dev-clean"
FLAC = f"LibriSpeech/{SUBSET}/84/121123/84-121123-0000.flac"
NO_PROXY_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def make_tarball(members):
    """A .tar.gz (bytes) holding {name: bytes}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# incompressible, so the archive is big enough to cut and resume
AUDIO = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
ARCHIVE = make_tarball({
    "LibriSpeech/README.TXT": b"LibriSpeech test copy\n",
    "LibriSpeech/SPEAKERS.TXT": b"84 | F | dev-clean | 8.02 | Christie Nowak\n",
    FLAC: AUDIO,
    f"LibriSpeech/{SUBSET}/84/121123/84-121123.trans.txt": b"84-121123-0000 GO DO YOU HEAR\n",
})
MD5 = hashlib.md5(ARCHIVE).hexdigest()
TABLE = {SUBSET: MD5}


class Server:
    """Serves {path: bytes}; records requests; may ignore Range or cut the first response short."""

    def __init__(self):
        self.files = {}
        self.honour_range = True
        self.cut_first_after = None  # bytes sent before closing the first response
        self.busy = []  # status codes answered to the first requests, in turn (e.g. [503, 503])
        self.retry_after = None  # the Retry-After header sent with them
        self.requests = []  # (path, Range header or None)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                requested_range = self.headers.get("Range")
                server.requests.append((self.path, requested_range))
                if server.busy:
                    self.send_response(server.busy.pop(0))
                    if server.retry_after is not None:
                        self.send_header("Retry-After", server.retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if requested_range and server.honour_range:
                    start = int(requested_range.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_first_after is not None and len(server.requests) == 1:
                    body = body[:server.cut_first_after]
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def waits(monkeypatch):
    """The waits between download tries, recorded instead of slept."""
    slept = []
    monkeypatch.setattr(librispeech, "_sleep", slept.append)
    return slept


@pytest.fixture
def server(monkeypatch):
    for key in list(os.environ):
        if "proxy" in key.lower():  # urllib would send 127.0.0.1 requests to a proxy
            monkeypatch.delenv(key)
    srv = Server()
    srv.files[f"/{SUBSET}.tar.gz"] = ARCHIVE
    yield srv
    srv.close()


def fetch(out, server, **kwargs):
    kwargs.setdefault("md5_table", TABLE)
    return librispeech.fetch_subsets([SUBSET], out, base_url=server.url, progress=False, **kwargs)


def assert_extracted(out):
    root = out / "LibriSpeech"
    assert (root / FLAC.removeprefix("LibriSpeech/")).read_bytes() == AUDIO
    assert (root / "README.TXT").exists() and (root / "SPEAKERS.TXT").exists()
    leftovers = [p.name for p in out.iterdir() if p.name != "LibriSpeech"]
    assert leftovers == [], leftovers  # no archive, .part or temporary extraction folder


def test_download_verify_extract_then_skip(tmp_path, server):
    paths = fetch(tmp_path, server)
    assert paths == [tmp_path / "LibriSpeech" / SUBSET]
    assert_extracted(tmp_path)
    assert server.requests == [(f"/{SUBSET}.tar.gz", None)]
    fetch(tmp_path, server)  # already extracted: no new request
    assert len(server.requests) == 1


def test_keep_archive(tmp_path, server):
    fetch(tmp_path, server, keep_archive=True)
    assert (tmp_path / f"{SUBSET}.tar.gz").read_bytes() == ARCHIVE
    assert (tmp_path / "LibriSpeech" / SUBSET).is_dir()


def test_kept_archive_is_reused_not_downloaded(tmp_path, server):
    (tmp_path / f"{SUBSET}.tar.gz").write_bytes(ARCHIVE)
    fetch(tmp_path, server)
    assert server.requests == []
    assert_extracted(tmp_path)


def test_checksum_mismatch_extracts_nothing_and_rerun_starts_clean(tmp_path, server):
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(tmp_path, server, md5_table={SUBSET: "0" * 32})
    assert list(tmp_path.iterdir()) == []  # corrupt download deleted, nothing extracted
    fetch(tmp_path, server)
    assert server.requests[-1] == (f"/{SUBSET}.tar.gz", None)
    assert_extracted(tmp_path)


def test_resume_sends_range_request(tmp_path, server):
    (tmp_path / f"{SUBSET}.tar.gz.part").write_bytes(ARCHIVE[:1000])
    fetch(tmp_path, server)
    assert server.requests == [(f"/{SUBSET}.tar.gz", "bytes=1000-")]
    assert_extracted(tmp_path)


def test_server_ignoring_range_restarts(tmp_path, server):
    server.honour_range = False
    (tmp_path / f"{SUBSET}.tar.gz.part").write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    fetch(tmp_path, server)
    assert server.requests == [(f"/{SUBSET}.tar.gz", "bytes=1000-")]
    assert_extracted(tmp_path)


def test_complete_part_file_is_accepted(tmp_path, server):
    (tmp_path / f"{SUBSET}.tar.gz.part").write_bytes(ARCHIVE)  # killed between download and rename
    fetch(tmp_path, server)
    assert server.requests == [(f"/{SUBSET}.tar.gz", f"bytes={len(ARCHIVE)}-")]
    assert_extracted(tmp_path)


def test_dropped_connection_is_resumed(tmp_path, server, waits):
    server.cut_first_after = 50_000
    fetch(tmp_path, server)
    assert server.requests == [(f"/{SUBSET}.tar.gz", None), (f"/{SUBSET}.tar.gz", "bytes=50000-")]
    assert_extracted(tmp_path)
    assert waits == [librispeech.BACKOFF_S]  # a pause before resuming, not an immediate retry


def test_retries_wait_longer_each_time(tmp_path, server, waits):
    url = server.url
    server.close()
    with pytest.raises(DownloadError, match="cannot download"):
        librispeech.download(f"{url}/{SUBSET}.tar.gz", tmp_path / "a.tar.gz", retries=5, progress=False)
    assert len(waits) == 4 and waits[0] > 0  # no wait after the last try
    assert all(later > earlier for earlier, later in zip(waits, waits[1:], strict=False))
    assert waits[-1] <= librispeech.BACKOFF_MAX_S


def test_busy_server_is_tried_again_after_the_wait_it_asks_for(tmp_path, server, waits):
    server.busy, server.retry_after = [503, 429], "7"
    fetch(tmp_path, server)
    assert len(server.requests) == 3 and waits == [7.0, 7.0]
    assert_extracted(tmp_path)


def test_server_errors_without_retry_after_back_off_then_give_up_in_one_sentence(tmp_path, server, waits):
    server.busy = [502] * 10
    with pytest.raises(DownloadError, match="HTTP 502"):
        librispeech.download(f"{server.url}/{SUBSET}.tar.gz", tmp_path / "a.tar.gz", retries=3, progress=False)
    assert len(server.requests) == 3 and waits == [librispeech.backoff_s(1), librispeech.backoff_s(2)]
    assert not (tmp_path / "a.tar.gz").exists()


def test_http_error_is_one_sentence(tmp_path, server, waits):
    with pytest.raises(DownloadError, match="HTTP 404"):
        librispeech.fetch_subsets(["dev-other"], tmp_path, base_url=server.url, progress=False)
    assert len(server.requests) == 1 and waits == []  # a missing file is not tried again


def test_network_error_keeps_nothing_half_done(tmp_path, server):
    url = server.url
    server.close()  # nothing listens there any more
    with pytest.raises(DownloadError, match="cannot download"):
        librispeech.download(f"{url}/{SUBSET}.tar.gz", tmp_path / "a.tar.gz", retries=1, progress=False)
    assert not (tmp_path / "a.tar.gz").exists()


def test_unknown_subset_is_an_error(tmp_path, server):
    with pytest.raises(UserError, match="unknown LibriSpeech subset 'dev-cleen'.*dev-clean"):
        librispeech.fetch_subsets(["dev-cleen"], tmp_path, base_url=server.url, progress=False)
    assert server.requests == []


def test_md5_table_has_published_subsets():
    assert librispeech.LIBRISPEECH_MD5["dev-clean"] == "42e2234ba48799c1f50f24a7926300a1"
    assert len(librispeech.LIBRISPEECH_MD5) == 7


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt", "LibriSpeech/../../evil.txt"])
def test_unsafe_members_are_refused(tmp_path, server, name):
    bad = make_tarball({FLAC: AUDIO, name: b"owned"})
    server.files[f"/{SUBSET}.tar.gz"] = bad
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="refusing to extract"):
        fetch(out, server, md5_table={SUBSET: hashlib.md5(bad).hexdigest()})
    assert not (out / "LibriSpeech").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == []  # the archive too: a rerun would trust it


def test_symlink_member_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("LibriSpeech/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    (tmp_path / "a.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(DownloadError, match="link"):
        librispeech.safe_extract(tmp_path / "a.tar.gz", tmp_path / "x")


def test_archive_of_another_subset_is_refused(tmp_path, server):
    other = make_tarball({"LibriSpeech/test-clean/1/2/1-2-0000.flac": b"x"})
    server.files[f"/{SUBSET}.tar.gz"] = other
    with pytest.raises(DownloadError, match=f"does not contain LibriSpeech/{SUBSET}"):
        fetch(tmp_path, server, md5_table={SUBSET: hashlib.md5(other).hexdigest()})
    assert not (tmp_path / "LibriSpeech" / SUBSET).exists()
    assert not (tmp_path / f"{SUBSET}.tar.gz").exists()  # a rerun would trust it


@pytest.mark.parametrize("content", [b"<html>503 Service Unavailable</html>\n", ARCHIVE[:len(ARCHIVE) // 2]],
                         ids=["not a tarball", "truncated tarball"])
def test_archive_that_passes_md5_but_is_no_tarball_is_one_line_and_deleted(tmp_path, server, content):
    """It was a tarfile.ReadError (or EOFError) traceback, and the archive stayed where the next run
    would check its MD5 again, trust it and fail the same way."""
    server.files[f"/{SUBSET}.tar.gz"] = content
    out = tmp_path / "out"
    result = run_cli("-o", str(out), "--subsets", SUBSET, "--base-url", server.url, "-q",
                     "--md5", f"{SUBSET}={hashlib.md5(content).hexdigest()}")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: cannot unpack {out / f'{SUBSET}.tar.gz'}")
    assert "deleted" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no archive, no .part, no extraction folder
    server.files[f"/{SUBSET}.tar.gz"] = ARCHIVE  # the rerun downloads again
    fetch(out, server)
    assert len(server.requests) == 2
    assert_extracted(out)


@pytest.mark.parametrize("url", ["notaurl", "http://", "ftp:/host/x", "http://host:port/x", "http://[::1"])
def test_bad_base_url_is_one_line_before_any_download(tmp_path, url):
    result = run_cli("-o", str(tmp_path / "out"), "--subsets", SUBSET, "--base-url", url, "-q")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: --base-url {url!r} is not a URL")
    assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "reverse_voicefilter.prepare.librispeech", *args], capture_output=True,
                          text=True, timeout=120, env=NO_PROXY_ENV)


def test_cli_downloads(tmp_path, server):
    result = run_cli("-o", str(tmp_path), "--subsets", SUBSET, "--base-url", server.url,
                     "--md5", f"{SUBSET}={MD5}", "-q")
    assert result.returncode == 0, result.stderr
    assert_extracted(tmp_path)


@pytest.mark.parametrize("args, code, message", [
    (["--subsets", "nope"], 2, "unknown LibriSpeech subset 'nope'"),
    (["--subsets", SUBSET, "--md5", f"{SUBSET}={'0' * 32}"], 1, "checksum mismatch"),
])
def test_cli_errors_are_one_line(tmp_path, server, args, code, message):
    result = run_cli("-o", str(tmp_path / "out"), "--base-url", server.url, "-q", *args)
    assert result.returncode == code
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr


def test_cli_unwritable_folder(tmp_path, server):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "sub"
    result = run_cli("-o", str(out), "--subsets", SUBSET, "--base-url", server.url, "-q")
    assert result.returncode != 0
    assert result.stderr.startswith("error: cannot write to") and result.stderr.count("\n") == 1
    assert server.requests == []
