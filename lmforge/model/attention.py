"""Causal self-attention kernels: which one runs, and why.

:func:`causal_attention` is the single entry point (``lmforge.model.gpt.SelfAttention``
calls it with q of shape (B, H, T, head_size) and k, v of shape (B, H_kv, S, head_size), where H_kv
divides H: grouped-query attention, each key/value head serving H // H_kv query heads). No mask and
more than one query position means causal attention; a boolean mask is used as given. It checks, in
this order:

0. One query position (decoding) on a CPU, no dropout, torch.compile tracing: attention written out as
   products and sums (the grouped heads as an axis, keys/values not repeated), which inductor fuses
   with the layers around it; its SDPA call cost ~70 us per layer of a 12-layer model's ~10 ms step
   (BENCHMARKS.md, "Decoding against llama.cpp"). Otherwise k and v are repeated to H heads, and:
1. :class:`CompiledCPUCausalAttention` (the CPU flash forward in bf16 and a backward written as
   bf16 matmuls that torch.compile fuses) when all of these hold: the device type is ``cpu``;
   the dtype is bfloat16; attention is causal (no mask, more than one query position); dropout
   is 0; the sequence length is at most 256; queries and keys have the same length (no KV cache);
   torch.compile is tracing.
2. Otherwise ``F.scaled_dot_product_attention`` as is (flash attention on GPUs) when any of these
   holds: the device type is not ``cpu``; the dtype is float32; the sequence length is at least
   512 and the head size at least 64.
3. Otherwise (a CPU, bf16 or fp16, a shorter sequence or smaller heads): the same SDPA call in
   float32, outside autocast, with the result cast back to the input dtype.

Mask and dropout reach SDPA in cases 2 and 3 unchanged. The measurements behind these thresholds
are in BENCHMARKS.md, "CPU attention kernels (why model/attention.py chooses as it does)".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class CompiledCPUCausalAttention(torch.autograd.Function):
    """Causal attention for short sequences on a CPU, for compiled bf16 training.

    Forward: PyTorch's flash kernel in bf16 (fast on CPUs). Backward: written out as bf16 matmuls
    plus elementwise work that torch.compile fuses, instead of the CPU flash backward, which is
    slow at these sizes. It materializes the (B, H, T, T) probabilities, so it is only for
    T <= 256; eagerly (unfused) it is slower than flash.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        T, scale = q.size(-2), 1.0 / math.sqrt(q.size(-1))
        pos = torch.arange(T, device=q.device)
        future = pos[None, :] > pos[:, None]
        # Recompute the probabilities from the forward's log-sum-exp: P = exp(QK^T * scale - lse).
        p = torch.exp((q @ k.transpose(-1, -2)).float() * scale - lse.unsqueeze(-1)).masked_fill(future, 0.0)
        d_v = p.to(q.dtype).transpose(-1, -2) @ d_out
        d_p = (d_out @ v.transpose(-1, -2)).float()
        # Softmax backward: dS = P * (dP - rowsum(dO * O)).
        d_s = (p * (d_p - (d_out.float() * out.float()).sum(-1, keepdim=True)) * scale).to(q.dtype)
        return d_s @ k, d_s.transpose(-1, -2) @ q, d_v


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0, causal: bool = True) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, hd) over k, v (B, H_kv, S, hd), kernel chosen as above.

    mask: boolean (B, 1, T, S) (or any shape that broadcasts to it), True = attend; None = causal (for
        T > 1; a single query attends to every key, as when decoding with a KV cache).
    dropout_p: attention dropout probability; pass 0.0 outside training.
    causal: False for an encoder: without a mask every query attends to every key.
    Returns (B, H, T, hd) in q's dtype.
    """
    # Decided by an if, which a compile guards on: a symbolic bool for SDPA's is_causal would break the graph.
    causal = True if causal and mask is None and q.size(-2) > 1 else False  # noqa: SIM210
    if q.device.type == "cpu" and q.size(-2) == 1 and dropout_p == 0.0 and torch.compiler.is_compiling():
        # Products and sums, not matmuls, which inductor would turn back into its SDPA call.
        B, H, _, hd = q.shape
        g = q.float().view(B, k.size(1), H // k.size(1), hd)  # (B, H_kv, group, hd)
        scores = (g.unsqueeze(-2) * k.float().unsqueeze(2)).sum(-1) / math.sqrt(hd)  # (B, H_kv, group, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # (B, 1, 1, S) broadcasts
        out = (scores.softmax(-1).unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # (B, H_kv, group, hd)
        return out.view(B, H, 1, hd).to(q.dtype)
    if k.size(1) != q.size(1):
        # Grouped-query attention: each key/value head serves q.size(1) // k.size(1) query heads.
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and causal and dropout_p == 0.0
            and q.size(-2) <= 256 and q.size(-2) == k.size(-2) and torch.compiler.is_compiling()):
        # Compiled CPU bf16 training: the fused bf16 backward beats the CPU flash backward here.
        return CompiledCPUCausalAttention.apply(q, k, v)
    if (q.device.type != "cpu" or q.dtype == torch.float32
            or (q.size(-2) >= 512 and q.size(-1) >= 64)):
        # PyTorch's own kernel: GPUs, fp32, and long sequences of 64-dim heads, where CPU bf16 flash wins.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
    # CPU bf16 flash is 2-4x slower than fp32 here; fp32 (outside autocast) is also more accurate.
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                           is_causal=causal, dropout_p=dropout_p)
    return y.to(q.dtype)
