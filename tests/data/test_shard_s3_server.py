"""s3:// shards against a real S3 protocol endpoint: moto's S3 server on 127.0.0.1 and the real AWS CLI (`aws s3 cp URL
-`, which mmgen runs for s3:// URLs), pointed at it with AWS_ENDPOINT_URL as a user points it at MinIO or R2. The
other s3 tests (tests/data/test_shard_urls.py) use a stand-in `aws`; this one checks the real CLI's arguments,
credentials and errors."""

import os
import shutil
import sys
from pathlib import Path

import pytest

import mmgen.data.shards as shards_module
from mmgen.data.captions import build_caption_dataset
from mmgen.data.robust import BadSample

from .test_webdataset_shards import captions_of, make_shards

moto_server = pytest.importorskip("moto.server", reason="moto[server] (a local S3 endpoint) is not installed")
boto3 = pytest.importorskip("boto3")


def aws_cli() -> str | None:
    """The AWS CLI of this environment (installed beside the interpreter), else one on PATH."""
    beside = Path(sys.executable).parent / "aws"
    return str(beside) if beside.is_file() else shutil.which("aws")


@pytest.fixture
def s3_endpoint(tmp_path, monkeypatch):
    """Captions of 3 shards uploaded to s3://bucket/laion/part-{00..02}.tar on a local moto S3 server, and the
    environment a user sets for an S3-compatible endpoint."""
    cli = aws_cli()
    if cli is None:
        pytest.skip("the AWS CLI (pip install awscli) is not installed")
    monkeypatch.setattr(shards_module, "_warned_shards", set())
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "config").write_text("[default]\nregion = us-east-1\n")
    environment = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_CONFIG_FILE": str(tmp_path / "aws" / "config"),
                   "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws" / "credentials"),
                   "PATH": f"{Path(cli).parent}{os.pathsep}{os.environ['PATH']}"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "shards").mkdir()
    paths, captions = make_shards(tmp_path / "shards", 3, 4, seed=13)
    client = boto3.client("s3", endpoint_url=environment["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket="bucket")
    for path in sorted(paths):
        client.upload_file(str(path), "bucket", f"laion/{Path(path).name}")
    yield captions
    server.stop()


def test_s3_shards_read_through_the_real_aws_cli(s3_endpoint):
    dataset = build_caption_dataset("s3://bucket/laion/part-{00..02}.tar", image_size=8, train=False)
    assert captions_of(dataset) == s3_endpoint


def test_a_missing_key_on_the_endpoint_is_one_bad_shard(s3_endpoint, capsys):
    samples = build_caption_dataset("s3://bucket/laion/part-{01..03}.tar", image_size=8, train=False)
    assert captions_of([sample for sample in samples if not isinstance(sample, BadSample)]) == s3_endpoint[4:]
    [missing] = [sample for sample in samples if isinstance(sample, BadSample)]
    assert missing.reason == "unreadable shard: command failed (exit 1)"
    assert "s3://bucket/laion/part-03.tar: command failed (exit 1)" in capsys.readouterr().err
