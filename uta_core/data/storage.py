"""Where bytes live: local paths or ``s3://bucket/prefix``, behind one pyarrow FileSystem.

Paths handed to pyarrow are scheme-less (``bucket/key`` on S3, absolute on local disk);
URIs shown to users keep the ``s3://`` scheme. S3 goes through
``pyarrow.fs.S3FileSystem(endpoint_override=...)`` and, for server-side copies, a boto3
client with ``endpoint_url``; the endpoint is explicit because pyarrow ignores the
``AWS_ENDPOINT_URL*`` variables. Credentials always come from the standard AWS chain
(environment, profile, instance role) and never pass through this module's arguments,
so nothing here can write them to a log, a manifest or MLflow.

Every storage failure a user can cause (missing path, missing bucket, refused
credentials, unreachable endpoint) surfaces as one ``StorageError`` naming the URI and
what to check.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from uta_core.secrets import redact_urls

S3_SCHEME = "s3://"
_GLOB_CHARS = re.compile(r"[*?\[]")
# Access key ids are not secret, but keep them out of messages anyway.
_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b")
_REQUEST_ID = re.compile(r"\s*\(Request ID: [^)]*\)")
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "AccessDenied",
           "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403")
_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "EndpointConnectionError",
                "Could not resolve host", "timed out")
_CREDENTIAL_HELP = (
    "check the AWS credentials (standard chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "AWS_PROFILE or ~/.aws, or an instance/pod role) and that they may access this bucket"
)


class StorageError(ValueError):
    """A path, bucket, credential or endpoint problem, explained in one sentence."""


@dataclass(frozen=True, kw_only=True)
class S3Options:
    """How to reach S3; credentials are deliberately absent (standard AWS chain only)."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO / moto; None = AWS
    region: str | None = None  # None: pyarrow/boto3 default (us-east-1 with a custom endpoint)
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        url = self.endpoint_url
        if url is not None and not re.match(r"^https?://[^/@\s]+/?$", url):
            raise ValueError(
                f"endpoint_url={redact_urls(url)!r} must look like http(s)://host[:port] without a path "
                "or user:password (credentials come from the AWS chain, never from the URL)"
            )
        if self.connect_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("connect_timeout_s and request_timeout_s must be positive seconds")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")


# --------------------------------------------------------------------- filesystems
def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


@functools.lru_cache(maxsize=8)
def s3_filesystem(options: S3Options) -> pafs.S3FileSystem:
    kwargs = {}
    if options.endpoint_url is not None:
        scheme, _, host = options.endpoint_url.rstrip("/").partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    region = options.region or ("us-east-1" if options.endpoint_url else None)
    if region is not None:
        kwargs["region"] = region
    return pafs.S3FileSystem(
        connect_timeout=options.connect_timeout_s,
        request_timeout=options.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
        **kwargs,
    )


@functools.lru_cache(maxsize=8)
def boto3_client(options: S3Options):
    """boto3 S3 client for what pyarrow lacks: conditional writes (the lease, the manifest), multipart
    server-side copy of > 5 GB objects, the teacher weights download."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.request_timeout_s,
        retries={"max_attempts": options.max_attempts, "mode": "standard"},
    )
    region = options.region or ("us-east-1" if options.endpoint_url else None)
    # a session of its own: boto3's default session would keep the credentials it found first for the process
    return boto3.Session().client("s3", endpoint_url=options.endpoint_url, region_name=region, config=config)


def filesystem_for(uri: str, s3: S3Options) -> tuple[pafs.FileSystem, str]:
    """``s3://bucket/prefix`` or a local path -> (filesystem, scheme-less path)."""
    if is_s3(uri):
        path = uri[len(S3_SCHEME):].strip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket; use s3://bucket/prefix")
        return s3_filesystem(s3), path
    if "://" in uri:
        raise StorageError(f"{uri!r}: only local paths and s3:// URIs are supported")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    return S3_SCHEME + path if isinstance(fs, pafs.S3FileSystem) else path


def join(*parts: str) -> str:
    """Join scheme-less path parts with '/' (both filesystems accept it)."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


# --------------------------------------------------------------------- errors
def _short(err: BaseException) -> str:
    text = _REQUEST_ID.sub("", str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
    return _KEY_ID.sub("<key id>", text)


def translate_error(err: BaseException, uri: str, s3: S3Options | None = None) -> StorageError:
    """One clear ``StorageError`` for a pyarrow/boto3 failure on ``uri`` (secrets never included)."""
    text = str(err) + " " + type(err).__name__
    endpoint = (s3.endpoint_url if s3 else None) or "the default AWS endpoint"
    if type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(f"no AWS credentials were found for {uri}: {_CREDENTIAL_HELP}")
    if any(marker in text for marker in _DENIED):
        return StorageError(f"access to {uri} was denied ({_short(err)}): {_CREDENTIAL_HELP}")
    if any(marker in text for marker in _UNREACHABLE):
        return StorageError(
            f"cannot reach {endpoint} for {uri} ({_short(err)}): check s3.endpoint_url and the network"
        )
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return StorageError(f"the bucket of {uri} does not exist; check the bucket name and s3.endpoint_url")
    if "NoSuchKey" in text or "(404)" in text or "Not Found" in text:
        return StorageError(f"{uri} does not exist; check the path (s3://bucket/key)")
    return StorageError(f"storage error on {uri}: {_short(err)}")


_PYARROW_WHERE = re.compile(r"(?:key|path) '([^']*)' in bucket '([^']+)'|bucket '([^']+)'")


def storage_failure(err: BaseException) -> StorageError | None:
    """The one line for a storage failure that reached a job's top (pyarrow's S3 ``OSError``, botocore's
    errors): None for anything else. The URI is the one pyarrow names, if it names one."""
    text = str(err)
    botocore = type(err).__module__.startswith(("botocore", "boto3"))
    if not botocore and not (isinstance(err, OSError) and ("AWS Error" in text or "S3" in text or "curl" in text)):
        return None
    found = _PYARROW_WHERE.search(text)
    uri = ("s3://" + found.group(2) + "/" + found.group(1) if found and found.group(2)
           else "s3://" + found.group(3) if found else "S3")
    return translate_error(err, uri)


def _info(fs: pafs.FileSystem, path: str, uri: str, s3: S3Options) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise translate_error(err, uri, s3) from None


def check_bucket(fs: pafs.FileSystem, path: str, s3: S3Options) -> None:
    """On S3, fail fast when the bucket is missing or the credentials are refused."""
    if not isinstance(fs, pafs.S3FileSystem):
        return
    bucket = path.split("/", 1)[0]
    uri = S3_SCHEME + bucket
    if _info(fs, bucket, uri, s3).type == pafs.FileType.NotFound:
        raise StorageError(
            f"S3 bucket {bucket!r} does not exist (at {s3.endpoint_url or 'AWS'}); "
            "check the bucket name and s3.endpoint_url"
        )


# --------------------------------------------------------------------- listing
def expand(patterns: Iterable[str], s3: S3Options, key: str = "input.paths") -> tuple[pafs.FileSystem,
                                                                                       list[pafs.FileInfo]]:
    """Paths, globs (``*``, ``?``, ``[..]``, ``**``) or s3:// URIs -> existing files/dirs, sorted.

    A missing path, an empty glob or a missing bucket is a ``StorageError`` naming ``key``, the setting
    that gave the paths.
    """
    patterns = list(patterns)
    if not patterns:
        raise StorageError("no input paths given")
    kinds = {is_s3(p) for p in patterns}
    if len(kinds) > 1:
        raise StorageError("input paths mix s3:// URIs and local paths; use one kind per job")
    found: dict[str, pafs.FileInfo] = {}
    fs = None
    for pattern in patterns:
        fs, path = filesystem_for(pattern, s3)
        check_bucket(fs, path, s3)
        for info in _expand_one(fs, path, pattern, s3, key):
            found.setdefault(info.path, info)
    return fs, [found[p] for p in sorted(found)]


def _expand_one(fs: pafs.FileSystem, path: str, uri: str, s3: S3Options, key: str) -> list[pafs.FileInfo]:
    parts = path.split("/")
    first_glob = next((i for i, part in enumerate(parts) if _GLOB_CHARS.search(part)), None)
    if first_glob is None:
        info = _info(fs, path, uri, s3)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"input path {uri} does not exist; check {key}")
        return [info]
    base = "/".join(parts[:first_glob]) or "/"
    if _info(fs, base, uri, s3).type != pafs.FileType.Directory:
        raise StorageError(f"input pattern {uri}: the folder {to_uri(fs, base)} does not exist; check {key}")
    regex = glob_regex(path)
    infos = list_dir(fs, base, recursive=True, uri=uri, s3=s3)
    matched = [info for info in infos if regex.fullmatch(info.path)]
    if not matched:
        raise StorageError(f"input pattern {uri} matched no files; check {key}")
    return matched


def glob_regex(pattern: str) -> re.Pattern:
    """Shell-style glob as a regex: ``*``/``?`` stay inside one path part, ``**`` crosses parts."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                out.append(f"[{'^' + body[1:] if body.startswith('!') else body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def list_dir(
    fs: pafs.FileSystem, path: str, *, recursive: bool, uri: str | None = None, s3: S3Options | None = None
) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as err:
        raise translate_error(err, uri or to_uri(fs, path), s3) from None
    return sorted(infos, key=lambda info: info.path)


def file_sizes(fs: pafs.FileSystem, path: str, s3: S3Options | None = None) -> tuple[dict[str, int], list[str]]:
    """(path -> size of every file under ``path``, the symbolic links found there): one listing, metadata only.
    A local listing never follows a link (a link to a folder elsewhere is not this folder's content), and
    never reports a file outside ``path``."""
    if not isinstance(fs, pafs.LocalFileSystem):
        infos = list_dir(fs, path, recursive=True, s3=s3)
        return {i.path: i.size for i in infos if i.type == pafs.FileType.File}, []
    sizes, links = {}, []
    for folder, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            full = os.path.join(folder, name)
            if os.path.islink(full):
                links.append(full)
            elif name in files:
                sizes[full] = os.stat(full).st_size
    return dict(sorted(sizes.items())), sorted(links)


# --------------------------------------------------------------------- reading / writing
def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    """Whole file, or None when it does not exist."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never a partial one."""
    if isinstance(fs, pafs.S3FileSystem):  # an S3 PUT only becomes visible when complete
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)
        return
    os.replace(write_beside(path, data), path)


def write_beside(path: str, data: bytes) -> str:
    """``data`` in a new temporary file next to the local ``path``, flushed to disk; returns its path (to rename
    or link into place, which is atomic: readers see the whole file or none)."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def is_atomic_leftover(name: str, of: str) -> bool:
    """``name`` is the temporary file of a ``write_bytes_atomic(.., of)`` killed before its rename."""
    return bool(re.fullmatch(rf"\.{re.escape(of)}\.[0-9a-f]{{8}}\.tmp", name))


def remove_atomic_leftovers(fs: pafs.FileSystem, path: str) -> int:
    """Delete what killed ``write_bytes_atomic(fs, path, ..)`` calls left; returns how many."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return 0  # on S3 a killed PUT leaves nothing
    parent, base = os.path.split(path)
    leftovers = [e for e in (os.listdir(parent) if os.path.isdir(parent) else []) if is_atomic_leftover(e, base)]
    for name in leftovers:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(parent, name))
    return len(leftovers)


def check_local_output(fs: pafs.FileSystem, path: str, key: str) -> None:
    """Refuse, before any work, a local output folder that cannot be created: its nearest
    existing ancestor must be a folder this user may write to. S3 prefixes are not checked here."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StorageError(f"{key}={path}: {existing} is a file, not a folder; choose an output path outside it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"{key}={path}: {existing} is not writable by this user; choose a writable folder")


def make_parent(fs: pafs.FileSystem, path: str) -> None:
    if not isinstance(fs, pafs.S3FileSystem):  # S3 has no folders to create
        fs.create_dir(os.path.dirname(path), recursive=True)


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def remove_dir(fs: pafs.FileSystem, path: str) -> None:
    """Remove ``path`` and everything under it (no-op when it does not exist).

    Not ``delete_dir_contents``: on S3 that leaves a ``path/`` marker object behind.
    """
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def delete_files(fs: pafs.FileSystem, paths: list[str], s3: S3Options) -> None:
    """Delete files (missing ones too). On S3 in batches of 1,000 keys per request, through boto3:
    pyarrow's ``delete_file`` writes a "folder" marker object for the parent."""
    if not paths:
        return
    if not isinstance(fs, pafs.S3FileSystem):
        for path in paths:
            delete_file(fs, path)
        return
    client = boto3_client(s3)
    by_bucket: dict[str, list[str]] = {}
    for path in paths:
        bucket, key = path.split("/", 1)
        by_bucket.setdefault(bucket, []).append(key)
    try:
        for bucket, keys in by_bucket.items():
            for i in range(0, len(keys), 1000):
                client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                             "Quiet": True})
    except Exception as err:  # botocore raises several unrelated types
        raise translate_error(err, S3_SCHEME + paths[0], s3) from None
