"""Inputs named by URI (`s3://...`) read through pyarrow.fs: the same store as the same files
on local disk, the same guarantees (complete reads, a changed object fails the build, errors
that name the URI and line). S3 is moto's server on loopback (about 1 s to start)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sftpack import ConfigError, InputError
from sftpack.build import build
from sftpack.config import BuildOptions
from sftpack.records import RecordReader, RemoteFile, expand_inputs

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.jsonl"
BUCKET = "inputs"


class S3:
    """A loopback S3 with a bucket: `put` uploads, `uri` names an object as users would."""

    def __init__(self, endpoint: str) -> None:
        import pyarrow.fs as pafs

        self.endpoint = endpoint
        self.fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            scheme="http",
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        self.fs.create_dir(BUCKET)

    def put(self, key: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{BUCKET}/{key}", compression=None) as f:  # bytes as given
            f.write(data)

    def uri(self, key: str, credentials: str = "") -> str:
        """Credentials come from the environment, or from `KEY:SECRET@` in the URI (Ray workers)."""
        at = f"{credentials}@" if credentials else ""
        return f"s3://{at}{BUCKET}/{key}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"


@pytest.fixture(scope="module")
def moto_s3():
    pytest.importorskip("moto.server")  # the dev extra: moto[server]
    pytest.importorskip("pyarrow.fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:  # no real credentials, no instance metadata lookups
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.delenv("AWS_PROFILE", raising=False)
        yield S3(f"{host}:{port}")
    server.stop()


def corpus(tmp_path: Path) -> list[Path]:
    """The sample as .jsonl, .jsonl.gz, .parquet and .jsonl.zst on local disk (uploaded by `upload`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    a, b, c, d = (tmp_path / n for n in ("a.jsonl", "b.jsonl.gz", "c.parquet", "d.jsonl.zst"))
    a.write_bytes(SAMPLE.read_bytes())
    b.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in reversed(rows)), mtime=0))
    pq.write_table(pa.Table.from_pylist(rows[::2]), c)
    d.write_bytes(zstandard.ZstdCompressor().compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows[1::2])))
    return [a, b, c, d]


def upload(s3: S3, prefix: str, files: list[Path]) -> None:
    for f in files:
        s3.put(f"{prefix}/{f.name}", f.read_bytes())


def same_store(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_glob_a_prefix_and_objects_build_the_store_of_the_same_local_files(moto_s3, tmp_path):
    files = corpus(tmp_path)
    upload(moto_s3, "same", files)
    moto_s3.put("same/notes.txt", b"not data")  # a prefix's other objects are left out, as locally
    options = BuildOptions(seq_length=64)
    local = build(files, tmp_path / "local", options, progress=False)
    glob = build(moto_s3.uri("same/*.[jp]*"), tmp_path / "glob", options, progress=False)
    prefix = build(moto_s3.uri("same/"), tmp_path / "prefix", options, progress=False)
    objects = [moto_s3.uri(f"same/{f.name}") for f in reversed(files)]  # sorted like local paths
    one_by_one = build(objects, tmp_path / "objects", options, progress=False)
    for summary in (glob, prefix, one_by_one):
        same_store(tmp_path / "local", summary.path)  # the fingerprint (in the manifest) hashes bytes, not names
        assert summary.documents == local.documents == 16 + 16 + 8 + 8
        assert summary.input_bytes == local.input_bytes == sum(f.stat().st_size for f in files)
    found = expand_inputs(moto_s3.uri("**/same/[a-d].*"))  # `**` spans zero or more levels
    assert [str(f) for f in found] == [f"s3://{BUCKET}/same/{f.name}" for f in files]  # no query, no secret
    assert all(isinstance(f, RemoteFile) for f in found)


def test_credentials_in_the_uri_are_used_and_never_shown(moto_s3, tmp_path, monkeypatch):
    upload(moto_s3, "creds", corpus(tmp_path)[:1])
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    [found] = expand_inputs(moto_s3.uri("creds/a.jsonl", credentials="testing:testing"))
    assert str(found) == f"s3://{BUCKET}/creds/a.jsonl" and "testing" not in repr(found)
    assert sum(1 for _ in RecordReader([found])) == 16


def test_a_missing_object_and_a_truncated_gzip_name_the_uri(moto_s3, tmp_path):
    options = BuildOptions(seq_length=64)
    with pytest.raises(InputError, match=rf"^s3://{BUCKET}/gone/a\.jsonl: does not exist"):
        build(moto_s3.uri("gone/a.jsonl"), tmp_path / "s", options, progress=False)
    with pytest.raises(ConfigError, match=rf"pattern 's3://{BUCKET}/gone/\*\.jsonl' matches no file"):
        build(moto_s3.uri("gone/*.jsonl"), tmp_path / "s", options, progress=False)
    with pytest.raises(ConfigError, match=r"cannot open the file system of nosuch://bucket/a\.jsonl: "):
        build("nosuch://bucket/a.jsonl?secret=x", tmp_path / "s", options, progress=False)
    whole = gzip.compress(SAMPLE.read_bytes(), mtime=0)
    moto_s3.put("cut/t.jsonl.gz", whole[: len(whole) * 2 // 3])
    with pytest.raises(InputError, match=rf"^s3://{BUCKET}/cut/t\.jsonl\.gz:\d+: the file is truncated") as err:
        build(moto_s3.uri("cut/t.jsonl.gz"), tmp_path / "s", options, progress=False)
    assert 1 < err.value.line <= 16  # the lines before the cut were read
    assert not (tmp_path / "s").exists()


def test_an_object_replaced_during_the_build_fails_it(moto_s3, tmp_path, monkeypatch):
    """Replaced by as many bytes, mostly within the same second (S3 mtimes are in seconds): the ETag tells."""
    import sftpack.build as b

    data = SAMPLE.read_bytes()
    moto_s3.put("moved/a.jsonl", data)
    fingerprint = b.fingerprint

    def then_replace(*args):
        fp = fingerprint(*args)
        moto_s3.put("moved/a.jsonl", data.replace(b"Paris", b"Lyon!"))
        return fp

    monkeypatch.setattr(b, "fingerprint", then_replace)
    with pytest.raises(InputError, match=rf"^s3://{BUCKET}/moved/a\.jsonl: the file changed while it was read"):
        build(moto_s3.uri("moved/a.jsonl"), tmp_path / "s", BuildOptions(seq_length=64), progress=False)
    assert not (tmp_path / "s").exists()


def test_a_local_build_and_import_never_import_pyarrow(tmp_path):
    code = (
        "import sys, sftpack\n"
        "from sftpack.build import build\n"
        "from sftpack.config import BuildOptions\n"
        f"build({str(SAMPLE)!r}, {str(tmp_path / 's')!r}, BuildOptions(seq_length=64), progress=False)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyarrow', 'ray')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_file_uris_and_the_cli(moto_s3, tmp_path, capsys):
    """`file://` goes through pyarrow's local file system; the CLI takes URIs as it takes paths."""
    from sftpack.cli import main

    files = corpus(tmp_path)
    upload(moto_s3, "cli", files)
    build(files, tmp_path / "local", BuildOptions(seq_length=64), progress=False)
    build([f"file://{f}" for f in files], tmp_path / "file", BuildOptions(seq_length=64), progress=False)
    same_store(tmp_path / "local", tmp_path / "file")
    assert main(["build", moto_s3.uri("cli/"), "--out", str(tmp_path / "cli"), "--seq-length", "64", "--quiet"]) == 0
    same_store(tmp_path / "local", tmp_path / "cli")
