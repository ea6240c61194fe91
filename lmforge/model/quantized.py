"""Weight-only integer quantization: Linear layers whose weights are stored as int8 or int4.

* ``int8``: one signed byte per weight and one scale per output channel (symmetric, round to nearest):
  ``w = q * scale``.
* ``int4``: two weights per byte, and a scale and a zero point per group of ``group_size`` consecutive
  inputs of each output channel (asymmetric, round to nearest): ``w = (q - 8) * scale + zero``, with q in
  0..15. Scales and zeros are stored in bf16, as PyTorch's int4 kernels take them.

Activations stay in floating point. How a product is computed depends on how many rows it has:

* one row (batch-1 decoding) on a CPU: PyTorch's own kernels, ``aten._weight_int8pack_mm`` and
  ``aten._weight_int4pack_mm_for_cpu``, which read the integers directly, in bf16 or fp32 activations, whichever
  this machine is measured to be faster at (their fp32 paths are far slower on some CPUs: BENCHMARKS.md,
  "Compression"); under torch.compile, products and sums over the integers that inductor fuses with their
  dequantization (as :class:`lmforge.model.gpt.Linear` does for float weights);
* several rows (a prefill, a batched decode step): those kernels cost about one matrix-vector product per row, so
  the weight is dequantized once and multiplied in float32;
* other devices: the weight dequantized for each call (correct, not faster).

What is stored (the state dict, hence a checkpoint's model.safetensors) is the portable form above; the
int4 kernel's own packed layout is made from it on first use, on the device it runs on.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.hardware import cached
from lmforge.model.gpt import GPT

Method = Literal["int8", "int4"]
METHODS: tuple[str, ...] = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes PyTorch's int4 kernels accept."""
_INT4_TILES = 2
"""innerKTiles of the int4 kernel's packed layout (gpt-fast's choice)."""


@dataclass(frozen=True)
class QuantSpec:
    """How a model was quantized: what its run.json records, and what rebuilds it for loading."""

    method: Method
    group_size: int = 32
    """int4: inputs per scale/zero group (int8 has one scale per output channel)."""
    include_embeddings: bool = False
    """Also quantize the token embedding and the output head (kept in bf16 otherwise)."""


def _int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scale.float()}


def _int4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    # Scale and zero are rounded to their stored bf16 first, and the integers chosen against the rounded
    # values: the error is then only the integers' rounding.
    scale = ((hi - lo).clamp(min=1e-8) / 15).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15).to(torch.uint8)
    q = q.reshape(n, k)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scale, "zeros": zero}


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N, K) integers 0..15 (low nibble first)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _measure_kernel_dtype() -> str:
    """The activation dtype ('float32' or 'bfloat16') in which the int8 CPU kernel runs faster here."""
    torch.manual_seed(0)
    w = torch.randn(2048, 512)
    tensors = _int8(w)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, scales = torch.randn(1, 512, dtype=dtype), tensors["scales"].to(dtype)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(10):
                torch.ops.aten._weight_int8pack_mm(x, tensors["qweight"], scales)
            best = min(best, time.perf_counter() - t)
        timings[str(dtype).removeprefix("torch.")] = best
    return min(timings, key=timings.get)


@functools.cache
def cpu_kernel_dtype() -> torch.dtype:
    """The activation dtype the integer CPU kernels run in: measured once per machine (then read from the
    hardware cache, once per process)."""
    return getattr(torch, str(cached(torch.device("cpu"), "int8_kernel_activation_dtype", _measure_kernel_dtype)))


class QuantLinear(nn.Module):
    """``nn.Linear`` with an int8 or int4 weight (see the module docstring); the bias stays floating point."""

    def __init__(self, in_features: int, out_features: int, bias: bool, method: Method, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        if method == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.zeros(out_features))
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.bfloat16))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._kernel: tuple | None = None  # (device, dtype, weight, scales) the kernel reads, made on first use

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, method: Method,
                    group_size: int = 32) -> QuantLinear:
        out_features, in_features = weight.shape
        q = cls(in_features, out_features, bias is not None, method, group_size).to(weight.device)
        w = weight.detach().float()
        for name, t in (_int8(w) if method == "int8" else _int4(w, group_size)).items():
            getattr(q, name).copy_(t)
        if bias is not None:
            q.bias.data.copy_(bias.detach())
        return q

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{group}"

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): the kernel's tensors are made anew
        self._kernel = None
        return super()._apply(fn, recurse)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Output channels ``idx`` of the weight, dequantized to float32 (an embedding lookup)."""
        flat = idx.reshape(-1)
        zeros = None if self.method == "int8" else self.zeros[flat]
        return self._dequantize(self.qweight[flat], self.scales[flat], zeros).reshape(*idx.shape, self.in_features)

    def _dequantize(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        """Float32 weight rows from their integers ``q``, scales and (int4) zeros."""
        if self.method == "int8":
            return q.float() * scales.float()[:, None]
        g = _unpack_int4(q).float().view(q.shape[0], -1, self.group_size)
        w = (g - 8) * scales.float()[..., None] + zeros.float()[..., None]
        return w.view(q.shape[0], self.in_features)

    def _decode_row(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (1, in_features) times the weight, written as products and sums that a compiled graph fuses with
        the dequantization (int4: the even and odd inputs against the low and high nibbles, no interleaving)."""
        if self.method == "int8":
            return (x[:, None, :] * self.qweight.float()).sum(-1) * self.scales
        n, half = self.out_features, self.in_features // 2
        groups = half // (self.group_size // 2)
        lo, hi = (self.qweight & 0xF).float(), (self.qweight >> 4).float()  # (out, in/2)
        even, odd = x[0, 0::2].contiguous(), x[0, 1::2].contiguous()  # the inputs each nibble meets
        scale = self.scales.float()
        per_input = scale[:, :, None].expand(n, groups, self.group_size // 2).reshape(n, half)
        xsum = (even + odd).view(groups, -1).sum(-1)  # (groups,)
        # w = (q - 8) * scale + zero, summed against x: scale * sum q x, plus (zero - 8 scale) * sum x per group.
        return ((lo * even + hi * odd) * per_input).sum(-1)[None] + ((self.zeros.float() - 8 * scale) * xsum).sum(-1)

    def dequantize(self, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight (out_features, in_features) in float32 (int8: its scales rounded to ``scale_dtype``
        first, as the int8 kernel takes them)."""
        if self.method == "int8":
            return self._dequantize(self.qweight, self.scales.to(scale_dtype), None)
        return self._dequantize(self.qweight, self.scales, self.zeros)

    def kernel_tensors(self, device: torch.device) -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
        """(activation dtype, weight, scales) the CPU kernel reads, made on first use (see :func:`prepare`)."""
        if self._kernel is None or self._kernel[0] != device:
            dtype = cpu_kernel_dtype()
            if self.method == "int8":
                tensors = (self.qweight, self.scales.to(dtype))
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    _unpack_int4(self.qweight).to(torch.int32), _INT4_TILES)
                scales_zeros = torch.stack((self.scales, self.zeros), dim=-1).transpose(0, 1).contiguous().to(dtype)
                tensors = (packed, scales_zeros)
            self._kernel = (device, dtype, *tensors)
        return self._kernel[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x.device.type != "cpu":
            y = F.linear(x2, self.dequantize().to(x.dtype))
        elif x2.shape[0] == 1 and torch.compiler.is_compiling():
            # One row (batch-1 decoding), compiled: as lmforge.model.gpt.Linear, a multiply-and-sum that inductor
            # fuses with the dequantization, reading the integers once.
            y = self._decode_row(x2.float()).to(x.dtype)
        elif x2.shape[0] == 1:
            dtype, a, b = self.kernel_tensors(x.device)
            if self.method == "int8":
                y = torch.ops.aten._weight_int8pack_mm(x2.to(dtype), a, b)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(dtype), a, self.group_size, b)
            y = y.to(x.dtype)
        else:
            # Several rows (a prefill, a batched decode step): PyTorch's integer kernels cost about one matrix-vector
            # product per row (a 768x256 int8 weight: 2.2 ms for 16 rows, 0.24 ms dequantized then multiplied), so
            # the weight is dequantized once and multiplied in float32, rounded as the kernel rounds (inputs, int8's
            # scales and the outputs in its dtype): a row in a batch gets what it gets alone up to the sums' order.
            dtype = self.kernel_tensors(x.device)[0]  # made by prepare() before a compile traces this
            with torch.autocast("cpu", enabled=False):
                y = F.linear(x2.to(dtype).float(), self.dequantize(dtype)).to(dtype).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def prepare(model: nn.Module, device: torch.device) -> None:
    """Make every :class:`QuantLinear`'s kernel tensors for ``device`` now: before torch.compile traces the model,
    which would otherwise break its graph at each layer's first use (the kernel dtype's measurement)."""
    if device.type == "cpu":
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.kernel_tensors(device)


class QuantEmbedding(nn.Module):
    """A token embedding read from a :class:`QuantLinear`'s rows: its own, or the output head's when the two
    are tied (then the one module is registered under both, and a checkpoint stores it once)."""

    def __init__(self, table: QuantLinear):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.rows(idx)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table.rows(idx)


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every Linear inside the Transformer blocks."""
    return [(f"blocks.{i}.{path}.{attr}", getattr(block, path), attr)
            for i, block in enumerate(model.blocks)
            for path, attr in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc"), ("mlp", "proj"))]


def quantize_model(model: nn.Module, spec: QuantSpec, *, empty: bool = False) -> nn.Module:
    """Replace ``model``'s (a GPT's) block Linears by :class:`QuantLinear` in place, and with
    ``include_embeddings`` its embedding and head; otherwise round those two to bf16, as they are stored.

    empty: only the structure, to load a quantized checkpoint into (no quantization work).
    """
    def convert(linear: nn.Linear) -> QuantLinear:
        if empty:
            return QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, spec.method,
                               spec.group_size).to(linear.weight.device)
        return QuantLinear.from_weight(linear.weight, linear.bias, spec.method, spec.group_size)

    for _, parent, attr in block_linears(model):
        setattr(parent, attr, convert(getattr(parent, attr)))
    tied = model.lm_head.weight is model.wte.weight
    if spec.include_embeddings:
        model.lm_head = convert(model.lm_head)
        table = model.lm_head if tied else convert(_as_linear(model.wte))
        model.wte = QuantEmbedding(table)
    elif not empty:
        for p in {id(p): p for p in (model.wte.weight, model.lm_head.weight)}.values():
            p.data = p.data.to(torch.bfloat16).to(p.dtype)
    return model


def _as_linear(emb: nn.Embedding) -> nn.Linear:
    linear = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device=emb.weight.device)
    linear.weight = emb.weight
    return linear


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def kept_in_bf16(model: nn.Module) -> set[str]:
    """State-dict names stored in bf16 although held in float32: a quantized model's embedding and head."""
    if not is_quantized(model) or isinstance(model.wte, QuantEmbedding):
        return set()
    return {"wte.weight", "lm_head.weight"}


def state_for_disk(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a quantized model's checkpoint stores: its state dict with each shared tensor once (under the
    first of its names in sorted order, as safetensors' ``load_model`` expects) and the embedding and head in
    bf16 (:func:`kept_in_bf16`)."""
    bf16 = kept_in_bf16(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, torch.dtype, tuple[int, ...]]] = set()
    sd = model.state_dict()
    for name in sorted(sd):
        t = sd[name]
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.to(torch.bfloat16) if name in bf16 else t.contiguous()
    return out


def dequantized(model: GPT) -> GPT:
    """A plain float32 :class:`GPT` with ``model``'s weights, the quantized ones dequantized (for export)."""
    quant = {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantLinear)}
    sd = {name: t.float() for name, t in model.state_dict().items() if name.rpartition(".")[0] not in quant}
    for name, m in quant.items():
        name = name.removesuffix(".table")  # a quantized embedding's rows are its weight
        sd[f"{name}.weight"] = m.dequantize()
        if m.bias is not None:
            sd[f"{name}.bias"] = m.bias.detach().float()
    plain = GPT(model.cfg).to(model.device)
    plain.load_state_dict(sd)
    return plain.eval()
