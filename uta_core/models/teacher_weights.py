"""Where a teacher comes from: an open_clip architecture name or config file, and its weights.

``arch`` is a registered open_clip name, a path to an open_clip model-config JSON file
(registered under the file's stem), or an open_clip ``hf-hub:``/``local-dir:`` source, which
carries its own weights. ``pretrained`` is an open_clip hub tag, a local weights file, or
``s3://bucket/key`` (downloaded once into a local cache with the job's ``S3Options``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import open_clip

from uta_core.data.storage import S3Options, boto3_client, translate_error
from uta_core.models.student import StudentConfig

SELF_CONTAINED_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip sources that carry their own weights
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")
DEFAULT_WEIGHTS_CACHE = "~/.cache/uta-pipelines/weights"


def carries_own_weights(arch: str) -> bool:
    return arch.startswith(SELF_CONTAINED_SCHEMAS)


def check_weights_chosen(arch: str, pretrained: str | None, random_seed: int | None) -> None:
    """Refuse random teacher weights unless asked for on purpose (a seed): a forgotten
    ``pretrained`` would otherwise train a student against noise without an error. Refuse
    hub weights on an architecture with another activation (``check_activation``)."""
    if pretrained is None and random_seed is None and not carries_own_weights(arch):
        raise ValueError(
            "teacher.pretrained is null, i.e. random weights: set teacher.pretrained=<tag, path or "
            "s3:// URI>, or teacher_random_seed=<int> to use a random-init teacher on purpose"
        )
    if pretrained is not None:
        check_activation(arch, pretrained)


def check_activation(arch: str, tag: str) -> None:
    """Hub weights must run with the activation they were trained with. OpenAI's (and MetaCLIP's,
    some LAION ViT-B-32s') need QuickGELU: open_clip only warns when ``ViT-L-14`` gets
    ``openai`` weights, and every token the teacher then computes is off (its self-check cannot
    see it: it runs the same model). open_clip's pretrained config of the tag says which it needs."""
    if arch not in open_clip.list_models():
        return  # a config file or a hf-hub/local-dir source: its own config decides
    needs = open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu")
    if needs is None:
        return  # not a hub tag of this arch (a file, s3://) or a tag that does not say
    has = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    if bool(needs) == has:
        return
    base = arch.removesuffix("-quickgelu")
    fix = f"{base}-quickgelu" if needs else base
    act = ("QuickGELU", "GELU")
    raise ValueError(
        f"teacher.pretrained={tag} was trained with {act[0] if needs else act[1]}, but teacher.arch={arch} "
        f"builds {act[0] if has else act[1]}: every teacher token would be wrong; set teacher.arch={fix}"
    )


def check_student_fits_teacher(arch: str, student: StudentConfig) -> None:
    """Compare the student's grid and out_dim with the teacher's open_clip config, without building
    the teacher (a driver-side check; ``hf-hub:``/``local-dir:`` sources are checked once built)."""
    if carries_own_weights(arch):
        return  # known only once built; the workers check it
    spec = open_clip.get_model_config(resolve_arch(arch))
    vision = spec["vision_cfg"]
    patch = vision.get("patch_size")
    if isinstance(patch, int) and student.img_size % patch:
        raise ValueError(
            f"the teacher ({arch}, patch {patch}) runs on the student's {student.img_size} px views, "
            f"which is not a multiple of {patch}; set student.img_size to a multiple of {patch}"
        )
    if isinstance(patch, int) and student.img_size // patch != student.grid[0]:
        side = student.img_size // patch
        raise ValueError(
            f"student grid {student.grid[0]}x{student.grid[1]} (patch {student.patch_size}) != teacher "
            f"grid {side}x{side} ({arch}, patch {patch} at {student.img_size} px); set student.patch_size={patch}"
        )
    if spec["embed_dim"] != student.out_dim:
        raise ValueError(f"student.out_dim={student.out_dim} but {arch} embeds into {spec['embed_dim']} dims; "
                         f"set student.out_dim={spec['embed_dim']}")


def resolve_arch(arch: str) -> str:
    """The open_clip model name for ``arch``; a model-config JSON path is registered first."""
    if arch.startswith(SELF_CONTAINED_SCHEMAS):
        return arch
    if arch.endswith(".json"):
        return register_model_config(arch)
    if arch not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip arch {arch!r}: use a name from open_clip.list_models() "
            "or a path to an open_clip model-config JSON file"
        )
    return arch


def register_model_config(path: str | Path) -> str:
    """Register an open_clip model-config JSON under its file stem; return that name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"model-config file {str(path)!r} does not exist")
    cfg = json.loads(path.read_text())
    if not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"model-config file {str(path)!r} needs embed_dim, vision_cfg and text_cfg")
    known = open_clip.get_model_config(path.stem)
    if known is None:
        open_clip.add_model_config(path)
    elif known != cfg:
        raise ValueError(
            f"model-config file {str(path)!r} is named {path.stem!r} like a different registered "
            "open_clip config; rename the file"
        )
    return path.stem


def resolve_pretrained(
    name: str,
    pretrained: str | None,
    *,
    s3: S3Options | None = None,
    cache_dir: str | Path | None = None,
) -> str | None:
    """What ``open_clip.create_model(pretrained=...)`` gets: None, a hub tag, or a local file."""
    if pretrained is None:
        return None
    if name.startswith(SELF_CONTAINED_SCHEMAS):
        raise ValueError(
            f"arch {name!r} carries its own weights; set pretrained to null (got {pretrained!r})"
        )
    if pretrained.startswith("hf-hub:"):
        raise ValueError(
            f"open_clip takes hf-hub sources as the arch: set arch={pretrained!r}, pretrained=null"
        )
    if pretrained.startswith("s3://"):
        return str(fetch_s3(pretrained, s3 or S3Options(), cache_dir=cache_dir))
    if open_clip.get_pretrained_cfg(name, pretrained):
        return pretrained
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    if os.sep in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES):
        raise ValueError(f"teacher weights file {pretrained!r} does not exist")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ValueError(
        f"pretrained={pretrained!r} is neither a known open_clip tag for {name} "
        f"(known: {tags}) nor an existing weights file"
    )


def fetch_s3(uri: str, s3: S3Options, *, cache_dir: str | Path | None = None) -> Path:
    """Download ``s3://bucket/key`` once into the local weights cache; return the local path."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI of one weights file")
    source_id = hashlib.sha256(f"{s3.endpoint_url or ''}{uri}".encode()).hexdigest()[:16]
    dest = Path(cache_dir or DEFAULT_WEIGHTS_CACHE).expanduser() / source_id / Path(key).name
    client = boto3_client(s3)
    try:
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except Exception as err:  # no credentials, refused, unreachable, no such key: one line naming the URI
        raise translate_error(err, uri, s3) from None
    if dest.is_file() and dest.stat().st_size == size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp)
        os.replace(tmp, dest)  # atomic: concurrent workers never see a partial file
    except Exception as err:
        raise translate_error(err, uri, s3) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
