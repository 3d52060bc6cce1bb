"""Corpora: cached, checksummed downloads from a local HTTP server; corpus validation; --data resolution."""

import hashlib
import http.server
import lzma
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from anexa_core import AnexaError, plugins
from anexa_core.data import corpus as data
from anexa_core.data.corpus import (
    LocalText,
    RemoteText,
    cache_dir,
    download,
    download_path,
    load_corpus,
    normalize_text,
    read_corpus,
)


class _Server:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1 and counts the requests it answers."""

    def __init__(self, files):
        self.files = files
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path == "/error":
                    self.send_error(500, "Internal Server Error")
                    return
                if self.path == "/slow":
                    time.sleep(1.0)  # longer than the client waits; it has hung up by now
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def sherlock_bytes(sherlock_path):
    return sherlock_path.read_bytes()


@pytest.fixture
def server(sherlock_bytes, monkeypatch):
    # A proxy configured in the environment must not intercept requests to the local server.
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    served = _Server({"/books/sherlock.txt": sherlock_bytes, "/notes/field-notes.txt": b"A short note.\n"})
    yield served
    served.close()


def _files_under(folder):
    return sorted(p for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ANEXA_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("ANEXA_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "anexa"


def test_download_verifies_and_then_uses_the_cache(server, sherlock_bytes):
    url = server.url("/books/sherlock.txt")
    sha = hashlib.sha256(sherlock_bytes).hexdigest()

    first = download(url, sha, "sherlock.txt")
    assert first.read_bytes() == sherlock_bytes
    assert first.is_relative_to(cache_dir())
    assert server.requests == ["/books/sherlock.txt"]

    again = download(url, sha, "sherlock.txt")
    assert again == first
    assert server.requests == ["/books/sherlock.txt"], "a cached file must not be downloaded again"
    assert _files_under(cache_dir()) == [first], "no temporary files may remain"


def test_corrupt_cached_file_is_fetched_again(server, sherlock_bytes):
    url = server.url("/books/sherlock.txt")
    sha = hashlib.sha256(sherlock_bytes).hexdigest()
    target = download_path(url, sha, "sherlock.txt")
    target.parent.mkdir(parents=True)
    target.write_bytes(sherlock_bytes[:1000])  # a truncated copy

    assert download(url, sha, "sherlock.txt").read_bytes() == sherlock_bytes
    assert len(server.requests) == 1


def test_checksum_mismatch_is_rejected_and_leaves_no_file(server):
    url = server.url("/books/sherlock.txt")
    wrong = "0" * 64
    with pytest.raises(AnexaError, match="checksum mismatch") as caught:
        download(url, wrong, "sherlock.txt")
    message = str(caught.value)
    assert "\n" not in message and wrong in message and url in message and "discarded" in message
    assert _files_under(cache_dir()) == []

    # Also when a stale, wrong file sat in the cache before.
    target = download_path(url, wrong, "sherlock.txt")
    target.write_bytes(b"stale")
    with pytest.raises(AnexaError, match="checksum mismatch"):
        download(url, wrong, "sherlock.txt")
    assert _files_under(cache_dir()) == []


@pytest.mark.parametrize("path", ["/error", "/missing.txt"])
def test_http_errors_say_offline_and_suggest_a_file(server, path):
    url = server.url(path)
    with pytest.raises(AnexaError) as caught:
        download(url, "0" * 64)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download {url} (HTTP ")
    assert "offline" in message and "--data FILE" in message
    assert _files_under(cache_dir()) == []


def test_unreachable_port_says_offline(monkeypatch):
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    with socket.socket() as sock:  # a port that was just free: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/book.txt"
    expected = r"^cannot download .*you seem to be offline; pass --data FILE"
    with pytest.raises(AnexaError, match=expected) as caught:
        download(url)
    assert "\n" not in str(caught.value)
    assert _files_under(cache_dir()) == []


def test_timeout_says_offline(server, monkeypatch):
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 0.2)
    with pytest.raises(AnexaError, match="you seem to be offline"):
        download(server.url("/slow"))
    assert _files_under(cache_dir()) == []


def test_remote_text_is_a_dataset(server, sherlock_bytes):
    from anexa_core.interfaces import Dataset

    sha = hashlib.sha256(sherlock_bytes).hexdigest()
    book = RemoteText(server.url("/books/sherlock.txt"), sha, "s.txt", "the book, served locally")
    assert isinstance(book, Dataset)
    (path,) = book.files()
    assert path.read_bytes() == sherlock_bytes
    with pytest.raises(AttributeError):
        book.url = "http://elsewhere"  # frozen: a dataset's pin cannot drift


def test_builtin_datasets_are_registered():
    datasets = plugins.registered("datasets")
    assert {"sherlock", "tinyshakespeare"} <= set(datasets)
    sherlock, _ = plugins.create("datasets", "sherlock")
    assert isinstance(sherlock, LocalText) and sherlock.path.suffix == ".xz" and sherlock.description
    shakespeare, _ = plugins.create("datasets", "tinyshakespeare")
    assert isinstance(shakespeare, RemoteText) and shakespeare.url.startswith("https://")
    assert len(shakespeare.sha256) == 64


def test_sherlock_ships_with_anexa_and_needs_no_network(sherlock_path, sherlock_bytes, no_network):
    """The packaged book is the project's copy of Project Gutenberg #1661 (header and footer removed)."""
    text, name = load_corpus("sherlock")
    assert name == "sherlock" and "To Sherlock Holmes she is always _the_ woman." in text
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == plugins.create("datasets", "sherlock")[0].sha256
    if hashlib.sha256(sherlock_bytes).hexdigest() == plugins.create("datasets", "sherlock")[0].sha256:
        assert text == sherlock_bytes.decode("utf-8")
    assert _files_under(cache_dir()) == [], "the packaged book needs no cache"


def test_a_damaged_packaged_book_is_refused(tmp_path):
    damaged = tmp_path / "sherlock.txt.xz"
    damaged.write_bytes(lzma.compress(b"To Sherlock Holmes she is always the woman."))
    book = LocalText(damaged, sha256="e21895308fe6da6919abc53e2cf77d81f914887897546153cc5d49b2eadefe50")
    with pytest.raises(AnexaError, match=r"is damaged .*reinstall anexa"):
        book.files()
    damaged.write_bytes(b"not xz at all")
    with pytest.raises(AnexaError, match="not a valid compressed file"):
        read_corpus(damaged)


def test_dataset_with_a_corrupt_cache_and_no_network_fails_cleanly(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    shakespeare, _ = plugins.create("datasets", "tinyshakespeare")
    seeded = download_path(shakespeare.url, shakespeare.sha256, shakespeare.filename)
    seeded.parent.mkdir(parents=True)
    seeded.write_text("not the play", encoding="utf-8")

    with pytest.raises(AnexaError, match="you seem to be offline"):
        load_corpus("tinyshakespeare")
    assert _files_under(cache_dir()) == [], "the corrupt copy must not be trusted or kept"


GUTENBERG = (
    "\ufeffThe Project Gutenberg eBook of A Test\r\n\r\nThis eBook is for the use of anyone anywhere.\r\n\r\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK A TEST ***\r\n\r\nChapter 1\r\nIt was a dark night.\r\n\r\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK A TEST ***\r\n\r\nSection 1. General Terms of Use\r\n"
)


def test_project_gutenberg_header_and_footer_are_not_trained_on(tmp_path, caplog):
    book = tmp_path / "pg.txt"
    book.write_bytes(GUTENBERG.encode("utf-8"))
    with caplog.at_level("INFO", logger="anexa"):
        assert read_corpus(book) == "Chapter 1\nIt was a dark night.\n"
    assert "without the Project Gutenberg licence header" in caplog.text
    plain = tmp_path / "plain.txt"
    plain.write_text("*** START OF nothing ***\nkept as it is\n", encoding="utf-8")
    assert read_corpus(plain) == "*** START OF nothing ***\nkept as it is\n"


@pytest.mark.parametrize(
    "text,expected",
    [("a\r\nb", "a\nb"), ("a\rb", "a\nb"), ("\ufeffab", "ab"), ("a\ufeffb", "a\ufeffb"), ("a\n\r\n", "a\n\n")],
)
def test_one_normalisation_for_corpora_and_prompts(text, expected):
    assert normalize_text(text) == expected


def test_load_corpus_from_a_file(sherlock_path, sherlock_bytes, no_network):
    text, name = load_corpus(str(sherlock_path))
    assert text == sherlock_bytes.decode("utf-8").replace("\r\n", "\n")
    assert name == sherlock_path.stem


def test_load_corpus_from_a_url_uses_the_cache(server):
    url = server.url("/notes/field-notes.txt")
    assert load_corpus(url) == ("A short note.\n", "field-notes")
    assert load_corpus(url) == ("A short note.\n", "field-notes")
    assert server.requests == ["/notes/field-notes.txt"]


def test_unknown_corpus_lists_the_datasets(tmp_path):
    with pytest.raises(AnexaError) as caught:
        load_corpus(str(tmp_path / "no-such-book"))
    message = str(caught.value)
    assert "\n" not in message
    assert "sherlock" in message and "tinyshakespeare" in message
    assert "file" in message and "URL" in message


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"  \n\t\r\n  \n", "is empty"),
        (b"\xef\xbb\xbf\n", "is empty"),  # only a byte-order mark
        (b"text with a NUL\x00 byte", "must be UTF-8 text"),
        ("caf\u00e9 au lait".encode("utf-16"), "must be UTF-8 text"),
        ("caf\u00e9 au lait".encode("latin-1"), "must be UTF-8 text"),
        (bytes(range(256)) * 4, "must be UTF-8 text"),
    ],
)
def test_bad_corpus_files_are_rejected(tmp_path, content, problem):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(AnexaError, match=problem) as caught:
        read_corpus(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(AnexaError, match=problem):
        load_corpus(str(path))


def test_missing_corpus_file_is_rejected(tmp_path):
    with pytest.raises(AnexaError, match="not found"):
        read_corpus(tmp_path / "absent.txt")
    with pytest.raises(AnexaError, match="folder"):
        read_corpus(tmp_path)


def test_read_corpus_drops_the_bom_and_normalises_line_endings(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes("\ufeffcaf\u00e9\r\nline two\rthree\n".encode("utf-8"))
    assert read_corpus(path) == "caf\u00e9\nline two\nthree\n"
