"""Shards named by URL, read the way users name them: http:// brace ranges served by a local http.server (a 404 and
a refused connection included), and s3:// URLs / `pipe:aws s3 cp ... -` through a fake `aws` on PATH."""

import functools
import http.server
import json
import os
import socket
import threading

import pytest

import mmgen.data.shards as shards_module
from mmgen import cli
from mmgen.data.captions import build_caption_dataset
from mmgen.data.robust import BadSample
from tests.clip.test_recipe import write_config

from .test_webdataset_shards import captions_of, make_shards


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test sees its damaged shards' warnings (a process warns about a shard once)."""
    monkeypatch.setattr(shards_module, "_warned_shards", set())


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, quietly, noting each requested path and its status."""

    requests: list = []

    def log_request(self, code="-", size="-"):
        self.requests.append((self.path, int(code)))

    def log_message(self, *arguments):
        pass


@pytest.fixture
def served(tmp_path):
    """(base URL, captions in file order, requests) of 3 shards of 8 samples served on 127.0.0.1."""
    folder = tmp_path / "www"
    folder.mkdir()
    _, captions = make_shards(folder, 3, 8, seed=11)
    handler = type("Handler", (RecordingHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", captions, handler.requests
    server.shutdown()
    server.server_close()
    thread.join()


def closed_port() -> int:
    """A local port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_http_brace_range_reads_like_the_files_and_a_404_is_a_bad_shard(served, capsys):
    base, captions, requests = served
    items = list(build_caption_dataset(f"{base}/part-{{00..03}}.tar", image_size=8, train=False))
    assert captions_of(items[:24]) == captions and len(items) == 25
    assert isinstance(items[24], BadSample) and items[24].source == f"{base}/part-03.tar"
    assert items[24].reason == "unreadable shard: download failed: HTTP error, e.g. 404 not found (curl exit 22)"
    assert sorted(requests) == [(f"/part-{shard:02d}.tar", 200) for shard in range(3)] + [("/part-03.tar", 404)]
    assert f"warning: {base}/part-03.tar: download failed" in capsys.readouterr().err


def test_a_refused_connection_is_a_bad_shard_per_url():
    url = f"http://127.0.0.1:{closed_port()}/part-{{00..01}}.tar"
    items = list(build_caption_dataset(url, image_size=8, train=False))
    assert [item.reason for item in items] == ["unreadable shard: download failed: cannot connect (curl exit 7)"] * 2


def shard_run_config(tmp_path, train: str, **train_options):
    return write_config(tmp_path, data={"train": train, "val": None, "cache": False, "zeroshot": None,
                                        "retrieval": None, "max_bad_fraction": 0.5},
                        train={"batch_size": 4, "max_steps": 7, "log_every": 1, "checkpoint_every": 0,
                               "eval_every": 100, **train_options})


def test_a_clip_run_trains_on_http_shards_and_counts_the_missing_one(served, tmp_path, capsys):
    base, _, requests = served
    run = tmp_path / "run"
    config = shard_run_config(tmp_path, f"{base}/part-{{00..03}}.tar")  # 7 steps of 4: all of epoch 0's 24 + 1
    assert cli.main(["train", "clip", "--config", str(config), "--out", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(record.get("data/skipped_total", 0) for record in records) >= 1
    assert {path for path, status in requests if status == 200} == {f"/part-{shard:02d}.tar" for shard in range(3)}
    assert "part-03.tar: download failed: HTTP error" in capsys.readouterr().err


def test_a_clip_run_whose_shards_all_fail_to_download_stops_with_one_error_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}/part-{{00..01}}.tar"
    config = shard_run_config(tmp_path, url)
    assert cli.main(["train", "clip", "--config", str(config), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("mmgen: error: the training stream yielded no complete batch") and "Traceback" not in err
    assert sorted(line.split(": download failed")[0] for line in lines[:-1]) == [
        f"warning: {url.replace('{00..01}', shard)}" for shard in ("00", "01")]


FAKE_AWS = """#!/bin/sh
# a stand-in for the AWS CLI: "aws s3 cp s3://BUCKET/KEY -" writes $FAKE_S3_ROOT/BUCKET/KEY to standard output
[ "$1 $2 $4" = "s3 cp -" ] || { echo "fake aws: unexpected arguments: $*" >&2; exit 2; }
exec cat "$FAKE_S3_ROOT/${3#s3://}"
"""


@pytest.fixture
def fake_s3(tmp_path, monkeypatch):
    """Captions of 3 shards at s3://bucket/laion/part-{00..02}.tar, readable by the fake `aws` on PATH."""
    (tmp_path / "s3" / "bucket" / "laion").mkdir(parents=True)
    _, captions = make_shards(tmp_path / "s3" / "bucket" / "laion", 3, 4, seed=12)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "aws").write_text(FAKE_AWS)
    (tmp_path / "bin" / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_S3_ROOT", str(tmp_path / "s3"))
    return captions


@pytest.mark.parametrize("spec", ["s3://bucket/laion/part-{00..02}.tar",
                                  "pipe:aws s3 cp s3://bucket/laion/part-{00..02}.tar -"])
def test_s3_shards_go_through_the_aws_cli(fake_s3, spec):
    assert captions_of(build_caption_dataset(spec, image_size=8, train=False)) == fake_s3


def test_a_missing_s3_key_or_a_missing_aws_cli_is_a_bad_shard(fake_s3, tmp_path, monkeypatch, capsys):
    [missing] = build_caption_dataset("s3://bucket/laion/part-09.tar", image_size=8, train=False)
    assert missing.reason == "unreadable shard: command failed (exit 1)"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    [no_cli] = build_caption_dataset("s3://bucket/laion/part-00.tar", image_size=8, train=False)
    assert no_cli.reason == "unreadable shard: command failed: command not found (exit 127)"
    assert "s3://bucket/laion/part-09.tar: command failed (exit 1)" in capsys.readouterr().err


def test_a_clip_run_trains_on_s3_shards(fake_s3, tmp_path):
    run = tmp_path / "run"
    config = shard_run_config(tmp_path, "s3://bucket/laion/part-{00..02}.tar", max_steps=4)
    assert cli.main(["train", "clip", "--config", str(config), "--out", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in record for record in records) == 4
    assert all(record.get("data/skipped_total", 0) == 0 for record in records)
