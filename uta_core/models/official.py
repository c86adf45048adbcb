"""Load the released UTA checkpoints (UTA-B/16, UTA-L/14-336, UTA-g/14-336) into the student.

The official checkpoints (github jihaonew/UTA, weights on the Hugging Face hub ``jjjjh/UTA``)
are the state dict of their ``CLIP`` module:

    visual.*       the EVA-02 image tower (``eva_vit_model/eva_vit.py``) with its ``head``
                   projection into the 1024-d joint space
    text.*         the CLIP text tower (``eva_vit_model/transformer.py``)
    logit_scale

``load_official_student`` maps ``visual.*`` one to one onto ``UTAStudent`` (trunk + head),
checks that the checkpoint's stored rotary tables equal the student's (the 16 x 16 RoPE
reference grid), and refuses any key it cannot map or any student weight left unset. The
text tower and ``logit_scale`` are returned untouched for the caller.

Official name -> ours (per block ``i``): ``attn.q_bias`` -> ``attn.q_proj.bias``,
``attn.v_bias`` -> ``attn.v_proj.bias``, ``mlp.w1`` (gate) -> ``mlp.fc1_g``, ``mlp.w2`` ->
``mlp.fc1_x``, ``mlp.ffn_ln`` -> ``mlp.norm``, ``mlp.w3`` -> ``mlp.fc2``; every other
``visual.<name>`` is ``trunk.<name>``, and ``visual.head`` is ``head``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from uta_core.models.student import ROPE_REFERENCE_GRID, VARIANTS, StudentConfig, UTAStudent

# The official towers by width: (our variant, heads; heads are not recoverable from weights).
WIDTHS = {768: "base", 1024: "large", 1408: "giant"}
# Mean/std the official models were trained and evaluated with (timm's OPENAI_CLIP_MEAN/STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RENAMES = (
    (re.compile(r"^blocks\.(\d+)\.attn\.q_bias$"), r"blocks.\1.attn.q_proj.bias"),
    (re.compile(r"^blocks\.(\d+)\.attn\.v_bias$"), r"blocks.\1.attn.v_proj.bias"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w1\.(weight|bias)$"), r"blocks.\1.mlp.fc1_g.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w2\.(weight|bias)$"), r"blocks.\1.mlp.fc1_x.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.ffn_ln\.(weight|bias)$"), r"blocks.\1.mlp.norm.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w3\.(weight|bias)$"), r"blocks.\1.mlp.fc2.\2"),
)
_ROPE_BUFFERS = ("rope.freqs_cos", "rope.freqs_sin")


class OfficialCheckpointError(ValueError):
    """A state dict that is not a UTA checkpoint this loader can map exactly."""


@dataclass
class OfficialCheckpoint:
    student: UTAStudent  # eval mode, trunk + head loaded
    text_state: dict[str, torch.Tensor] = field(default_factory=dict)  # text.* without the prefix
    logit_scale: torch.Tensor | None = None
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD


def official_student_config(visual: dict[str, torch.Tensor]) -> StudentConfig:
    """The student config of an official image tower, read from its weight shapes."""
    try:
        width = visual["cls_token"].shape[-1]
        patch = visual["patch_embed.proj.weight"].shape[-1]
        positions = visual["pos_embed"].shape[1] - 1
        out_dim = visual["head.weight"].shape[0]
    except KeyError as err:
        raise OfficialCheckpointError(f"not an official UTA image tower: visual.{err.args[0]} is missing") from None
    if width not in WIDTHS:
        raise OfficialCheckpointError(
            f"an official UTA tower of width {width} is unknown; the released ones are {sorted(WIDTHS)} (B, L, g)"
        )
    variant = WIDTHS[width]
    depth = 1 + max(int(m.group(1)) for k in visual if (m := re.match(r"blocks\.(\d+)\.", k)))
    if depth != VARIANTS[variant]["depth"]:
        raise OfficialCheckpointError(
            f"width {width} is UTA-{variant} but the checkpoint has {depth} blocks, not {VARIANTS[variant]['depth']}"
        )
    side = round(positions**0.5)
    if side * side != positions:
        raise OfficialCheckpointError(f"pos_embed holds {positions} patch positions: not a square grid")
    return StudentConfig(variant=variant, img_size=side * patch, patch_size=patch, out_dim=out_dim,
                         rope_ref_grid=ROPE_REFERENCE_GRID)


def student_state_from_official(visual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``visual.*`` (prefix removed) -> ``UTAStudent`` state-dict names (rotary buffers dropped)."""
    out = {}
    for name, value in visual.items():
        if name.endswith(_ROPE_BUFFERS):  # the shared table, also registered under every block's attn
            continue
        if name.startswith("head."):
            out[name] = value
            continue
        for pattern, repl in _RENAMES:
            if pattern.match(name):
                name = pattern.sub(repl, name)
                break
        out[f"trunk.{name}"] = value
    return out


def _check_rope(student: UTAStudent, visual: dict[str, torch.Tensor]) -> None:
    """The checkpoint's rotary tables (N, head_dim) against the student's: same grid, same layout."""
    if "rope.freqs_cos" not in visual:
        return  # saved without buffers: nothing to compare
    sin_NR, cos_NR = student.trunk.rope.get_embed().chunk(2, dim=-1)
    for ours, key in ((cos_NR, "rope.freqs_cos"), (sin_NR, "rope.freqs_sin")):
        theirs = visual[key].to(ours.dtype)
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-4):
            raise OfficialCheckpointError(
                f"visual.{key} differs from the student's rotary table (shape {tuple(theirs.shape)} vs "
                f"{tuple(ours.shape)}): the checkpoint's RoPE grid is not the 16x16 reference grid this loader maps"
            )


def load_official_student(state: dict[str, Any]) -> OfficialCheckpoint:
    """An official UTA state dict -> the student (head included) + the untouched text tower."""
    state = _unwrap(state)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    text = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    other = sorted(k for k in state if not k.startswith(("visual.", "text.")) and k != "logit_scale")
    if not visual:
        raise OfficialCheckpointError("no visual.* keys: not an official UTA checkpoint (CLIP state dict)")
    if other:
        raise OfficialCheckpointError(f"keys outside visual.*, text.*, logit_scale cannot be mapped: {other[:5]}")
    student = UTAStudent(official_student_config(visual))
    _check_rope(student, visual)
    mapped = student_state_from_official(visual)
    ours = student.state_dict()
    unknown = sorted(k for k in mapped if k not in ours)
    if unknown:
        raise OfficialCheckpointError(f"official keys with no place in the student: {unknown[:5]}")
    mismatched = [k for k, v in mapped.items() if v.shape != ours[k].shape]
    if mismatched:
        k = mismatched[0]
        raise OfficialCheckpointError(f"{k}: checkpoint shape {tuple(mapped[k].shape)} vs student "
                                      f"{tuple(ours[k].shape)}")
    unset = sorted(set(ours) - set(mapped) - {"mask_token"})  # [MASK] exists only for the MIM baseline
    if unset:
        raise OfficialCheckpointError(f"student weights the checkpoint does not hold: {unset[:5]}")
    student.load_state_dict(mapped, strict=False)
    return OfficialCheckpoint(student=student.eval(), text_state=text, logit_scale=state.get("logit_scale"))


def official_config_of_file(path: str) -> StudentConfig | None:
    """The student config of a local released checkpoint file, read from its weight shapes without
    reading its weights (memory-mapped); None for a file without ``visual.*`` keys."""
    state = _unwrap(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
    visual = {k.removeprefix("visual."): v for k, v in state.items() if isinstance(k, str) and k.startswith("visual.")}
    return official_student_config(visual) if visual else None


def is_official_state(state: dict[str, Any]) -> bool:
    """Whether a loaded torch file looks like an official UTA checkpoint (a CLIP with visual.* keys)."""
    return any(isinstance(k, str) and k.startswith("visual.") for k in _unwrap(state))


def _unwrap(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict itself, also when saved as ``{"state_dict": ...}``."""
    inner = state.get("state_dict")
    return inner if isinstance(inner, dict) else state
