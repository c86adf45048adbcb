"""Replacing a file only if nobody else has since: what lets a store refuse a deposed writer.

``file_version`` names the version of a file a writer last read or wrote (an S3 ETag; a local inode,
mtime and size); ``replace_if_unchanged`` writes the file whole only if it is still at that version.
On S3 the store itself enforces it (a conditional PUT: ``If-Match`` or ``If-None-Match: *``); on a
local disk the version is compared just before the rename, which leaves a window of one system call.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from uta_core.data.storage import (
    S3_SCHEME,
    S3Options,
    boto3_client,
    to_uri,
    translate_error,
    write_beside,
)
from uta_core.errors import RunCannotContinue


class ChangedUnderneath(RunCannotContinue):
    """A file another writer replaced since this one last wrote or read it."""


def is_missing_key(err: BaseException) -> bool:
    """A boto3 error that says the object is not there (HEAD answers 404, GET NoSuchKey)."""
    response = getattr(err, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code in ("NoSuchKey", "404", "NotFound")


def file_version(fs: pafs.FileSystem, path: str, s3: S3Options) -> str | None:
    """What identifies this version of a file (an S3 ETag; a local inode, mtime and size); None if absent."""
    if isinstance(fs, pafs.S3FileSystem):
        from botocore.exceptions import ClientError

        bucket, _, key = path.partition("/")
        try:
            return boto3_client(s3).head_object(Bucket=bucket, Key=key)["ETag"]
        except ClientError as err:
            if is_missing_key(err):
                return None
            raise translate_error(err, S3_SCHEME + path, s3) from None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def replace_if_unchanged(fs: pafs.FileSystem, path: str, data: bytes, version: str | None, s3: S3Options) -> str:
    """Write ``path`` whole only if it is still at ``version`` (None: still absent); returns the new version.
    On S3 the store enforces it (a conditional PUT: ``If-Match`` the ETag, or ``If-None-Match: *``); on a local
    disk the version is compared just before the rename. Raises ``ChangedUnderneath`` otherwise."""
    where = to_uri(fs, path)
    if isinstance(fs, pafs.S3FileSystem):
        from botocore.exceptions import ClientError

        bucket, _, key = path.partition("/")
        condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
        try:
            return boto3_client(s3).put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                             "NoSuchKey"):
                raise ChangedUnderneath(f"{where} was replaced by another writer since this job last saw it; "
                                        "this job stops without overwriting it") from None
            raise translate_error(err, where, s3) from None
    tmp = write_beside(path, data)
    if file_version(fs, path, s3) != version:
        os.remove(tmp)
        raise ChangedUnderneath(f"{where} was replaced by another writer since this job last saw it; this job stops "
                                "without overwriting it")
    os.replace(tmp, path)
    return file_version(fs, path, s3)
