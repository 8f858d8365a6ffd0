"""Downloads against a local server (127.0.0.1 only) that fails, stalls and truncates: retries with
backoff, timeouts, atomic writes, second sources, one clear offline error; CounterFact's Hub copy."""
import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from engramlib import download as D
from engramlib import facts as F

FIXTURES = Path(__file__).parent / "fixtures"
BODY = b"0123456789" * 5000                    # 50 kB: several reads of download.CHUNK


class Server:
    """A local HTTP server whose answers are scripted per path: a list of behaviours consumed one
    request at a time ("ok", "fail" = HTTP 500, "404", "stall", "truncate"); the last one repeats."""

    def __init__(self):
        self.files, self.script, self.hits = {}, {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path
                server.hits[path] = server.hits.get(path, 0) + 1
                steps = server.script.get(path, ["ok"])
                step = steps.pop(0) if len(steps) > 1 else steps[0]
                body = server.files.get(path)
                if body is None or step == "404":
                    self.send_error(404)
                    return
                if step == "fail":
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if step == "stall":
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    server.release.wait(5)              # hangs until the test ends
                elif step == "truncate":
                    self.wfile.write(body[:len(body) // 2])
                else:
                    self.wfile.write(body)

        self.release = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def local_only(monkeypatch, tmp_path):
    """No test reaches the internet: any other host is 'unreachable'; fast retries; own cache."""
    real = D.urllib.request.urlopen

    def urlopen(request, *args, **kwargs):
        url = request.full_url if hasattr(request, "full_url") else request
        if not url.startswith("http://127.0.0.1:"):
            raise D.urllib.error.URLError("network unreachable (test)")
        return real(request, *args, **kwargs)
    monkeypatch.setattr(D.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(D, "BACKOFF", 0.01)
    monkeypatch.setattr(D, "TIMEOUT", 0.5)
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ENGRAM_MIRROR", raising=False)


def leftovers(folder: Path) -> list:
    return [p.name for p in folder.rglob(".*part")]


def test_failures_are_retried_with_backoff(server, tmp_path, monkeypatch):
    server.files["/f"], server.script["/f"] = BODY, ["fail", "fail", "ok"]
    waits = []
    monkeypatch.setattr(D.time, "sleep", waits.append)
    out = D.download(server.url + "/f", tmp_path / "f.bin", retries=3, backoff=0.5, progress=False)
    assert out.read_bytes() == BODY and server.hits["/f"] == 3
    assert waits == [0.5, 1.0]                                       # exponential backoff


def test_a_stalled_transfer_times_out_and_is_retried(server, tmp_path):
    server.files["/f"], server.script["/f"] = BODY, ["stall", "ok"]
    start = time.perf_counter()
    out = D.download(server.url + "/f", tmp_path / "f.bin", timeout=0.3, progress=False)
    assert out.read_bytes() == BODY and server.hits["/f"] == 2
    assert time.perf_counter() - start < 2


def test_a_truncated_transfer_never_lands_in_the_cache(server, tmp_path):
    server.files["/f"], server.script["/f"] = BODY, ["truncate"]
    target = tmp_path / "f.bin"
    with pytest.raises(D.DownloadError, match="IncompleteRead"):
        D.download(server.url + "/f", target, retries=2, progress=False)
    assert server.hits["/f"] == 2 and not target.exists() and leftovers(tmp_path) == []
    server.script["/f"] = ["truncate", "ok"]
    assert D.download(server.url + "/f", target, progress=False).read_bytes() == BODY


def test_content_the_check_rejects_is_never_written(server, tmp_path):
    server.files["/f"] = b"not what we want"

    def check(path):
        raise ValueError("wrong format")
    with pytest.raises(D.DownloadError, match="wrong format"):
        D.download(server.url + "/f", tmp_path / "f.bin", check=check, retries=2, progress=False)
    assert not (tmp_path / "f.bin").exists() and leftovers(tmp_path) == []


def test_a_missing_file_goes_to_the_second_source_without_retries(server, tmp_path):
    server.files["/b/f"] = BODY
    out = D.download([server.url + "/a/f", server.url + "/b/f"], tmp_path / "f.bin", progress=False)
    assert out.read_bytes() == BODY and server.hits == {"/a/f": 1, "/b/f": 1}
    with pytest.raises(D.NotPublished):
        D.download([server.url + "/a/g"], tmp_path / "g.bin", progress=False)


def test_offline_is_one_clear_error(tmp_path):
    with pytest.raises(D.DownloadError) as err:
        D.download(["https://example.org/f", "https://example.com/f"], tmp_path / "f.bin",
                   progress=False, offline_hint="Use TinyWorld.")
    message = str(err.value)
    assert "Offline? Use TinyWorld." in message and "2 source(s), 3 time(s)" in message
    assert not isinstance(err.value, D.NotPublished)


def test_the_progress_bar_runs(server, tmp_path, capsys):
    server.files["/f"] = BODY
    D.download(server.url + "/f", tmp_path / "f.bin", progress=True, what="a file")
    assert "a file" in capsys.readouterr().err


def test_known_facts_come_from_the_mirror_then_the_cache(server, monkeypatch):
    known = (FIXTURES / "standin" / "known_1000.json").read_bytes()
    server.files["/data/dsets/known_1000.json"] = known
    monkeypatch.setenv("ENGRAM_MIRROR", server.url)
    assert F.load_known_facts() == json.loads(known)
    assert server.hits["/data/dsets/known_1000.json"] == 1
    assert F.load_known_facts() == json.loads(known)                  # no second request
    assert server.hits["/data/dsets/known_1000.json"] == 1


def test_known_facts_second_source_is_the_reference_repository(monkeypatch):
    sources = F._sources(F.KNOWN_FACTS_URL)
    assert sources[0] == F.KNOWN_FACTS_URL and "raw.githubusercontent.com/kmeng01/rome" in sources[1]
    monkeypatch.setenv("ENGRAM_MIRROR", "http://127.0.0.1:9/")
    assert F._sources(F.COUNTERFACT_URL)[0] == "http://127.0.0.1:9/data/dsets/counterfact.json"


def test_a_truncated_json_is_rejected_and_offline_error_says_what_to_do(server, monkeypatch):
    server.files["/data/dsets/counterfact.json"] = b'[{"case_id": 0, "requested_rew'
    monkeypatch.setenv("ENGRAM_MIRROR", server.url)
    monkeypatch.setattr(F, "_counterfact_via_hub", lambda target: (_ for _ in ()).throw(
        RuntimeError("the Hub copy failed too")))
    with pytest.raises(D.DownloadError, match="not valid JSON.*Offline.*counterfact_records"):
        F.load_counterfact()
    assert not any((Path(D.cache_dir())).rglob("counterfact.json"))


def hub_rows():
    """The official-format fixture as the Hub copy's two splits give it: rows out of order, the
    nested fields as dicts and lists (what `datasets` returns for struct and sequence features)."""
    records = json.loads((FIXTURES / "standin" / "counterfact.json").read_text())
    rows = [dict(r) for r in records]
    return records, {"train": rows[::2][::-1], "test": rows[1::2]}


def test_counterfact_from_the_hub_is_the_official_file():
    records, splits = hub_rows()
    assert F.counterfact_from_hub(splits["train"] + splits["test"]) == records
    with pytest.raises(ValueError, match="twice"):
        F.counterfact_from_hub(splits["train"] * 2)
    with pytest.raises(ValueError, match="lacks"):
        F.counterfact_from_hub([{"case_id": 0}])


def test_counterfact_falls_back_to_the_hub_copy(monkeypatch):
    """The host is unreachable: the Hub copy is loaded with `datasets` and stored as the official
    file (the size check is the real file's 21,919 records, here the fixture's)."""
    import sys
    import types
    records, splits = hub_rows()
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name: splits if name == F.COUNTERFACT_HUB else None
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(F, "COUNTERFACT_SIZE", len(records))
    assert F.load_counterfact() == records
    assert json.loads((D.cache_dir() / "counterfact.json").read_text()) == records
