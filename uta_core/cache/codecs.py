"""Token codecs of the teacher cache: teacher tokens <-> the bytes of one row's ``tokens`` cell.

Every codec stores one view's tokens as one fixed-size byte string (the ``tokens`` column is
``fixed_size_binary``), so a reader turns a whole column into a (B, bytes) uint8 array
without a copy and restores the tokens where it is cheapest: on the training device.

| codec          | bytes per view (T = 1+N tokens, D dims)  | restores                        |
|----------------|------------------------------------------|---------------------------------|
| float16        | 2 T D                                    | the tokens                      |
| int8           | T D                                      | unit-norm token directions      |
| lowrank_int8   | 2 D (CLS fp16) + N (2 + r)               | CLS; patch directions, rank r   |

``lowrank_int8`` keeps the CLS token (what zero-shot uses) at fp16 and stores each patch
token's unit direction as int8 coordinates in a rank-r basis fitted on a sample of this
teacher's patch tokens (PCA: mean + top-r principal directions), with one fp16 scale per
token. The basis is stored with the cache (``token_basis.safetensors``). The loss is a
cosine, so only directions matter; the CLS keeps its norm for zero-shot checks.

Shape legend: B views, T = 1+N tokens (CLS first), D embed dim, r basis rank, S stored bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TOKEN_CODECS = ("float16", "int8", "lowrank_int8")
INT8_SCALE = 127.0
BASIS_FILE = "token_basis.safetensors"


@dataclass(frozen=True)
class LowRankBasis:
    """Patch-token PCA: ``mean_D`` and orthonormal ``components_DR`` (columns), fp32."""

    mean_D: torch.Tensor
    components_DR: torch.Tensor

    @property
    def rank(self) -> int:
        return self.components_DR.shape[1]

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({"mean": self.mean_D.contiguous(), "components": self.components_DR.contiguous()})

    @classmethod
    def from_bytes(cls, data: bytes) -> LowRankBasis:
        from safetensors.torch import load

        tensors = load(data)
        return cls(mean_D=tensors["mean"].float(), components_DR=tensors["components"].float())

    def to(self, device: torch.device | str) -> LowRankBasis:
        return LowRankBasis(mean_D=self.mean_D.to(device), components_DR=self.components_DR.to(device))


def fit_basis(tokens_BTD: torch.Tensor, rank: int) -> LowRankBasis:
    """PCA of the unit-normalised patch tokens (CLS excluded) of a sample of views."""
    patches_MD = F.normalize(tokens_BTD[:, 1:].reshape(-1, tokens_BTD.shape[-1]).double(), dim=-1)
    if rank > patches_MD.shape[1]:
        raise ValueError(f"output.token_rank={rank} exceeds the teacher's embed dim {patches_MD.shape[1]}")
    mean_D = patches_MD.mean(0)
    centred_MD = patches_MD - mean_D
    eigvals_D, eigvecs_DD = torch.linalg.eigh(centred_MD.T @ centred_MD)  # ascending
    components_DR = eigvecs_DD[:, -rank:].flip(-1)
    return LowRankBasis(mean_D=mean_D.float(), components_DR=components_DR.float().contiguous())


def quantize_int8(tokens_BTD: torch.Tensor) -> torch.Tensor:
    """Per token, scale the largest |component| to 127 and round.

    The loss is a cosine, so each token's scale need not be stored. Absmax scaling uses
    the whole int8 range: scaling the L2-normalised token by 127 instead leaves components
    near 127/sqrt(D) (about 4 for D = 1024), i.e. a few bits, and a ~10x worse cosine.
    """
    x_BTD = tokens_BTD.float()
    scale_BT1 = INT8_SCALE / x_BTD.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.round(x_BTD * scale_BT1).clamp_(-127, 127).to(torch.int8)


def dequantize_int8(q_BTD: torch.Tensor) -> torch.Tensor:
    """int8 tokens -> unit-norm float tokens (the direction is all the cosine loss needs)."""
    return F.normalize(q_BTD.float(), dim=-1)


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) tensor -> (B, S) uint8 of its little-endian bytes."""
    return x.contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def _field(stored_BS: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes [start, start + count * itemsize) of every row, read as ``count`` values of ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    return stored_BS[:, start:start + count * size].contiguous().view(dtype)


@dataclass(frozen=True)
class TokenCodec:
    """One cache's token codec; ``encode`` on the teacher's device, ``decode`` on the trainer's."""

    name: str
    token_shape: tuple[int, int]  # (T, D)
    basis: LowRankBasis | None = None

    def __post_init__(self) -> None:
        if self.name not in TOKEN_CODECS:
            raise ValueError(f"token codec must be one of {list(TOKEN_CODECS)}, got {self.name!r}")
        if self.name == "lowrank_int8" and self.basis is None:
            raise ValueError("the lowrank_int8 codec needs the cache's token basis (token_basis.safetensors)")

    @property
    def bytes_per_view(self) -> int:
        T, D = self.token_shape
        if self.name == "float16":
            return 2 * T * D
        if self.name == "int8":
            return T * D
        return 2 * D + (T - 1) * (2 + self.basis.rank)

    def encode(self, tokens_BTD: torch.Tensor) -> np.ndarray:
        """float tokens -> (B, bytes_per_view) uint8 on the host."""
        if tuple(tokens_BTD.shape[1:]) != tuple(self.token_shape):
            raise ValueError(f"tokens of shape {tuple(tokens_BTD.shape[1:])}, the codec expects {self.token_shape}")
        if self.name == "float16":
            stored_BS = _as_bytes(tokens_BTD.to(torch.float16))
        elif self.name == "int8":
            stored_BS = _as_bytes(quantize_int8(tokens_BTD))
        else:
            basis = self.basis.to(tokens_BTD.device)
            x_BTD = tokens_BTD.float()
            patches_BND = F.normalize(x_BTD[:, 1:], dim=-1) - basis.mean_D
            coords_BNR = patches_BND @ basis.components_DR
            scale_BN1 = coords_BNR.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / INT8_SCALE
            q_BNR = torch.round(coords_BNR / scale_BN1).clamp_(-127, 127).to(torch.int8)
            stored_BS = torch.cat([_as_bytes(x_BTD[:, 0].to(torch.float16)),
                                   _as_bytes(scale_BN1.squeeze(-1).to(torch.float16)), _as_bytes(q_BNR)], dim=1)
        return stored_BS.cpu().numpy()

    def decode(self, stored_BS: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, bytes_per_view) uint8 -> float32 tokens (B, T, D) on the same device."""
        if isinstance(stored_BS, np.ndarray):
            stored_BS = torch.from_numpy(stored_BS if stored_BS.flags.writeable else stored_BS.copy())
        if stored_BS.dtype != torch.uint8 or stored_BS.ndim != 2 or stored_BS.shape[1] != self.bytes_per_view:
            raise ValueError(f"stored tokens must be (B, {self.bytes_per_view}) uint8 for the {self.name} codec, "
                             f"got {tuple(stored_BS.shape)} {stored_BS.dtype}; is this row from this cache?")
        B, (T, D) = stored_BS.shape[0], self.token_shape
        if self.name == "float16":
            return _field(stored_BS, 0, T * D, torch.float16).reshape(B, T, D).float()
        if self.name == "int8":
            return dequantize_int8(_field(stored_BS, 0, T * D, torch.int8).reshape(B, T, D))
        N, basis = T - 1, self.basis.to(stored_BS.device)
        cls_BD = _field(stored_BS, 0, D, torch.float16).float()
        scale_BN1 = _field(stored_BS, 2 * D, N, torch.float16).float().unsqueeze(-1)
        q_BNR = _field(stored_BS, 2 * D + 2 * N, N * basis.rank, torch.int8).reshape(B, N, basis.rank)
        patches_BND = (q_BNR.float() * scale_BN1) @ basis.components_DR.T + basis.mean_D
        return torch.cat([cls_BD.unsqueeze(1), F.normalize(patches_BND, dim=-1)], dim=1)


def basis_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def token_cosine(restored_BTD: torch.Tensor, original_BTD: torch.Tensor) -> dict[str, float]:
    """Mean and minimum cosine of restored vs original tokens, CLS and patches apart."""
    cos_BT = F.cosine_similarity(restored_BTD.float(), original_BTD.float(), dim=-1)
    return {"cls_mean": cos_BT[:, 0].mean().item(), "patch_mean": cos_BT[:, 1:].mean().item(),
            "patch_min": cos_BT[:, 1:].min().item()}

