"""Block-structured attention of pi0 (masks, RoPE, SDPA / flash-attn backends).

pi0's masks are *block-causal*: every token carries a block id (prefix = block 0; pi0's state token = block 1;
the action tokens = the last block) and a token attends to every valid token whose block id is <= its own. So the
prefix attends bidirectionally within itself and never to the suffix, and the action tokens attend to the prefix,
the state token and bidirectionally to each other (openpi's ``make_att_2d_masks`` with ``ar_mask``).

The same description drives both backends:
- ``sdpa``: one dense boolean mask, :func:`torch.nn.functional.scaled_dot_product_attention`;
- ``flash``: one flash-attn varlen call per query block over that block's packed visible keys (no dense mask);
  the packing (:func:`varlen_plan`) needs host syncs, so it is computed once per layout and reused.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BlockLayout", "VarlenPlan", "apply_rope", "attend", "block_mask", "flash_available", "flash_fits", "resolve_backend",
           "varlen_plan"]


@functools.cache
def _flash_installed() -> bool:
    # pi0 resolves its backend on every encode and velocity call; a missing package would search sys.path each time
    return importlib.util.find_spec("flash_attn") is not None


def flash_available(device: torch.device | str) -> bool:
    """flash-attn usable: the ``gpu`` extra is installed and ``device`` is a CUDA device of compute capability
    >= 8.0 (flash-attn 2 runs on Ampere and newer only)."""
    dev = torch.device(device)
    return dev.type == "cuda" and _flash_installed() and torch.cuda.get_device_capability(dev)[0] >= 8


FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


def flash_fits(q: Tensor, *kv: Tensor) -> bool:
    """The call fits flash-attn 2's contract: q (and the given k, v) fp16 or bf16 of one dtype (no fp32 kernel)
    and head dim <= 256."""
    return q.dtype in FLASH_DTYPES and all(t.dtype == q.dtype for t in kv) and q.shape[-1] <= FLASH_MAX_HEAD_DIM


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend of config value ``pi0.attention`` on ``device``.

    ``auto`` -> ``auto`` where :func:`flash_available` (then :func:`attend` picks flash-attn per call for the calls
    that fit its contract, :func:`flash_fits`, and SDPA for the rest: fp32 q/k/v at ``engine.dtype: float32``),
    else ``sdpa``. ``flash`` -> ``flash`` (every call must fit; :func:`attend` raises otherwise).

    Raises:
        RuntimeError: ``flash`` requested without flash-attn or without a CUDA device of compute capability >= 8.
    """
    if name == "auto":
        return "auto" if flash_available(device) else "sdpa"
    if name == "flash" and not flash_available(device):
        raise RuntimeError("pi0.attention=flash needs a CUDA device of compute capability >= 8.0 (Ampere or newer) "
                           "and flash-attn (pip install -e .[gpu]); set pi0.attention: auto or sdpa")
    if name not in ("sdpa", "flash"):
        raise ValueError(f"unknown attention backend {name!r}; use auto, sdpa or flash")
    return name


def apply_rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Rotary position embedding in Gemma's half-split form (as ``transformers`` Gemma).

    Args:
        x: ``[B, heads, S, head_dim]`` queries or keys.
        pos: ``[B, S]`` integer positions.
        theta: RoPE base.

    Returns:
        ``[B, heads, S, head_dim]``, dtype of ``x`` (angles computed in float32).
    """
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    freqs = pos.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def block_mask(q_block: Tensor, k_block: Tensor, key_valid: Tensor) -> Tensor:
    """Dense boolean mask of the block-causal structure.

    Args:
        q_block: ``[Sq]`` int64 block id of each query.
        k_block: ``[Sk]`` int64 block id of each key.
        key_valid: ``[B, Sk]`` bool, False for padding.

    Returns:
        ``[B, Sq, Sk]`` bool, True = may attend. A query that sees no key (a padded prefix token) is allowed all
        keys, so its (unused) output stays finite instead of NaN, which would leak into later layers' values.
    """
    allowed = (k_block[None, None, :] <= q_block[None, :, None]) & key_valid[:, None, :]
    return allowed | ~allowed.any(-1, keepdim=True)


VarlenFn = Callable[..., Tensor]


def _flash_varlen() -> VarlenFn:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@dataclass(frozen=True)
class BlockLayout:
    """The block ids of one attention layout, on the host and on the device, built once and reused.

    The host copy lets :func:`varlen_plan` pack without reading device tensors; the device tensors are created
    here (a host-to-device copy, not allowed inside a CUDA-graph capture), so build layouts outside captured code
    and keep them (pi0 caches one per device and prefix length).

    Attributes:
        q_ids, k_ids: host block id of every query / key (tuples of ints).
        q_block: ``[Sq]`` int64, k_block: ``[Sk]`` int64 on the device.
        q_idx: per distinct query block (ascending ids): ``[nq]`` int64 device positions of its queries.
    """

    q_ids: tuple[int, ...]
    k_ids: tuple[int, ...]
    q_block: Tensor
    k_block: Tensor
    q_idx: tuple[Tensor, ...]

    @classmethod
    def build(cls, q_ids, k_ids, device: torch.device | str) -> BlockLayout:
        """From host sequences of block ids (ints)."""
        q_ids, k_ids = tuple(int(b) for b in q_ids), tuple(int(b) for b in k_ids)
        q_idx = tuple(torch.tensor([i for i, x in enumerate(q_ids) if x == b], dtype=torch.long, device=device)
                      for b in sorted(set(q_ids)))
        return cls(q_ids, k_ids, torch.tensor(q_ids, dtype=torch.long, device=device),
                   torch.tensor(k_ids, dtype=torch.long, device=device), q_idx)

    @classmethod
    def from_tensors(cls, q_block: Tensor, k_block: Tensor) -> BlockLayout:
        """From device tensors of block ids: reads them on the host (two syncs on a GPU)."""
        return cls.build(q_block.tolist(), k_block.tolist(), q_block.device)


@dataclass(frozen=True)
class VarlenBlock:
    """One query block of a :class:`VarlenPlan`: which queries, and where each sample's visible keys sit.

    Attributes:
        q_idx: ``[nq]`` int64 positions of the block's queries; ``nq`` its length (a host int).
        k_b, k_s: ``[B * Sk]`` int64 sample and key position of every packed key slot (sample-major: sample b's
            visible keys, in order, fill slots ``cu_k[b] .. cu_k[b + 1]``; the slots after ``cu_k[B]`` are unused
            and point at key 0).
        cu_q, cu_k: ``[B + 1]`` int32 cumulative query / key counts (flash-attn's ``cu_seqlens``).
        max_k: an upper bound of the visible key sequence lengths (host int, flash-attn's ``max_seqlen_k``): ``Sk``.
    """

    q_idx: Tensor
    nq: int
    k_b: Tensor
    k_s: Tensor
    cu_q: Tensor
    cu_k: Tensor
    max_k: int


@dataclass(frozen=True)
class VarlenPlan:
    """The flash backend's packing of one block-causal layout, computed once per layout and reused by every layer
    and every call with the same layout (:func:`varlen_plan`). Its tensor shapes depend only on ``[B, Sk]`` and
    the block ids, never on which keys are valid, so one CUDA graph serves every call of a shape."""

    blocks: tuple[VarlenBlock, ...]
    batch: int
    num_keys: int


def varlen_plan(q_block: Tensor, k_block: Tensor, key_valid: Tensor, layout: BlockLayout | None = None) -> VarlenPlan:
    """Packing of the block-causal layout ``(q_block, k_block, key_valid)`` (see :func:`block_mask`).

    Device ops only, with static shapes: sample b's visible keys are scattered to slots ``cu_k[b] + rank`` of a
    ``B * Sk`` slot array (``rank`` = running count of visible keys, a cumsum), and ``max_k = Sk`` is a host bound
    (flash-attn sizes its grid with it; the true lengths are in ``cu_k``). So with ``layout`` given (the block ids
    on the host) there is no host sync and the plan can be built inside a CUDA-graph capture; without it the block
    ids are read on the host once (:meth:`BlockLayout.from_tensors`).

    Args:
        q_block: ``[Sq]`` int64; k_block: ``[Sk]`` int64; key_valid: ``[B, Sk]`` bool.
        layout: the same block ids as a :class:`BlockLayout` (preferred: no host read).

    Returns:
        :class:`VarlenPlan` on ``key_valid``'s device.
    """
    layout = layout or BlockLayout.from_tensors(q_block, k_block)
    B, Sk = key_valid.shape
    dev = key_valid.device
    kb_dev = layout.k_block.to(dev)
    flat = torch.arange(B * Sk, device=dev)
    blocks = []
    for b, qi in zip(sorted(set(layout.q_ids)), layout.q_idx, strict=True):
        nq = int(qi.numel())  # host metadata: no sync
        vis = (kb_dev <= b)[None, :] & key_valid  # [B, Sk]
        # a sample whose visible keys are all padding (a padded prefix) keeps every key: finite, unused output
        vis = vis | ~vis.any(-1, keepdim=True)
        lens_k = vis.sum(-1).to(torch.int32)
        cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
        dest = cu_k[:-1, None].long() + vis.long().cumsum(-1) - 1  # [B, Sk] slot of each visible key
        dest = torch.where(vis, dest, B * Sk).flatten()  # hidden keys go to a dump slot
        src = torch.zeros(B * Sk + 1, dtype=torch.long, device=dev).scatter_(0, dest, flat)[:-1]
        blocks.append(VarlenBlock(
            q_idx=qi.to(dev), nq=nq, k_b=src // Sk, k_s=src % Sk,
            cu_q=torch.arange(0, (B + 1) * nq, nq, device=dev, dtype=torch.int32), cu_k=cu_k, max_k=Sk))
    return VarlenPlan(tuple(blocks), B, Sk)


def attend(q: Tensor, k: Tensor, v: Tensor, q_block: Tensor, k_block: Tensor, key_valid: Tensor,
           backend: str = "sdpa", varlen_fn: VarlenFn | None = None, plan: VarlenPlan | None = None,
           mask: Tensor | None = None) -> Tensor:
    """Multi-query / grouped-query attention under a block-causal mask.

    Args:
        q: ``[B, Hq, Sq, hd]``; k, v: ``[B, Hkv, Sk, hd]`` with ``Hq % Hkv == 0``; same dtype.
        q_block, k_block, key_valid: see :func:`block_mask`.
        backend: ``sdpa``, ``flash`` or ``auto`` = flash where :func:`flash_fits` else sdpa
            (see :func:`resolve_backend`).
        varlen_fn: replaces flash-attn's ``flash_attn_varlen_func`` (tests pass a CPU reference).
        plan: ``flash`` only: :func:`varlen_plan` of this layout, computed once and reused (without it, each call
            computes it: a few host syncs per call).
        mask: SDPA only: :func:`block_mask` of this layout ``[B, Sq, Sk]``, computed once and reused by the layers.

    Returns:
        ``[B, Sq, Hq * hd]``, dtype of ``q``; softmax scale ``hd ** -0.5`` (Gemma).

    Raises:
        ValueError: backend ``flash`` with q/k/v outside flash-attn 2's contract (fp32, or head dim > 256).
    """
    B, Hq, Sq, hd = q.shape
    if backend == "auto":
        backend = "flash" if flash_fits(q, k, v) else "sdpa"
    elif backend == "flash" and not flash_fits(q, k, v):
        raise ValueError(f"pi0.attention=flash: flash-attn 2 takes fp16/bf16 q/k/v with head dim <= "
                         f"{FLASH_MAX_HEAD_DIM}, got {q.dtype} with head dim {hd}; set engine.dtype: bfloat16 (and "
                         "pi0.vlm_dtype: bfloat16), or pi0.attention: auto (SDPA for such calls) or sdpa")
    if backend == "sdpa":
        mask = block_mask(q_block, k_block, key_valid) if mask is None else mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=Hq != k.shape[1])
        return out.transpose(1, 2).reshape(B, Sq, Hq * hd)
    if backend != "flash":
        raise ValueError(f"unknown attention backend {backend!r}")
    plan = plan or varlen_plan(q_block, k_block, key_valid)
    if plan.batch != B or plan.num_keys != k.shape[2]:
        raise ValueError(f"attention plan is for [B, Sk] = [{plan.batch}, {plan.num_keys}], got keys "
                         f"{tuple(k.shape)}; build it with varlen_plan for this layout")
    return _flash_blockwise(q, k, v, plan, varlen_fn or _flash_varlen())


def _flash_blockwise(q: Tensor, k: Tensor, v: Tensor, plan: VarlenPlan, varlen_fn: VarlenFn) -> Tensor:
    """Block-causal attention as one non-causal varlen call per query block (keys packed per sample by the
    plan's integer indices: no host sync)."""
    B, Hq, Sq, hd = q.shape
    out = q.new_empty(B, Sq, Hq, hd)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, S, H, hd] (flash layout)
    for blk in plan.blocks:
        o = varlen_fn(qt[:, blk.q_idx].reshape(-1, Hq, hd), kt[blk.k_b, blk.k_s], vt[blk.k_b, blk.k_s], blk.cu_q,
                      blk.cu_k, blk.nq, blk.max_k, dropout_p=0.0, softmax_scale=hd ** -0.5, causal=False)
        out[:, blk.q_idx] = o.view(B, blk.nq, Hq, hd)
    return out.reshape(B, Sq, Hq * hd)


def reference_varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, *,
                     dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False) -> Tensor:
    """flash-attn's ``flash_attn_varlen_func`` contract in plain PyTorch (one SDPA per sequence); CPU tests only.

    Shapes: ``q [total_q, Hq, hd]``, ``k, v [total_k, Hkv, hd]``; ``cu_q, cu_k [B + 1]`` int32 offsets.
    Enforces what flash-attn 2 checks, so CPU tests fail where the GPU would: q/k/v fp16 or bf16 of one dtype,
    head dim <= 256, int32 ``cu_seqlens``.

    Raises:
        RuntimeError: an input flash-attn 2 rejects.
    """
    if q.dtype not in FLASH_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError(f"FlashAttention only supports fp16 and bf16 data type (q {q.dtype}, k {k.dtype}, "
                           f"v {v.dtype})")
    if q.shape[-1] > FLASH_MAX_HEAD_DIM:
        raise RuntimeError(f"FlashAttention forward only supports head dimension at most 256, got {q.shape[-1]}")
    if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32:
        raise RuntimeError(f"cu_seqlens_q / cu_seqlens_k must have dtype int32, got {cu_q.dtype} / {cu_k.dtype}")
    assert not causal and dropout_p == 0.0
    outs = []
    for i in range(cu_q.numel() - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None]
        ks = k[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None]
        vs = v[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale, enable_gqa=qs.shape[1] != ks.shape[1])
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)
