"""GGUF export: the tensors, metadata and tokenizer as llama.cpp reads them, quantization within each format's
error bound, refusals that leave no file, and (with llama-cpp-python) llama.cpp's greedy tokens against ours.

The GGUF side is checked against tensors built here independently of lmforge.compress.gguf (names, splits and
the RoPE row order written out index by index), and the RoPE order once more by what it is for: llama.cpp's
pairwise rotation of the file's rows gives the attention scores our rotate-half RoPE gives."""

from __future__ import annotations

import errno
import json
import struct
import subprocess

import gguf
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import AddedToken

from lmforge.compress.gguf import export_gguf, read_gguf
from lmforge.config import ModelConfig, from_dict
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import StorageError, UserError
from lmforge.generate import generate
from lmforge.model.gpt import GPT, apply_rope, rope_cache
from lmforge.presets import PRESETS

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there: the world says hello",
         "a tiny corpus for a tiny tokenizer, with numbers 123 and 4567"]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS, vocab_size=300)


def _cfg(tok: Tokenizer, preset: str, **overrides) -> ModelConfig:
    return from_dict(ModelConfig, {"preset": preset, "vocab_size": tok.vocab_size, "n_layer": 2, "n_embd": 64,
                                   "n_head": 4, "block_size": 64, **overrides})


def _model(cfg: ModelConfig, scale: float = 0.02, seed: int = 0) -> GPT:
    """Every tensor random (norm gains near 1, biases nonzero): a misplaced or dropped one cannot pass."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.dim() == 1 and "norm" in name and name.endswith(".weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if gain else scale * torch.randn_like(p))
    return model


def _rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Each head's rows in llama.cpp's RoPE order, index by index: file row 2j is our row j, 2j + 1 is j + d/2."""
    hd = w.shape[0] // n_heads
    return w[[h * hd + r // 2 + (r % 2) * (hd // 2) for h in range(n_heads) for r in range(hd)]]


def _expected(model: GPT) -> dict[str, np.ndarray]:
    """The GGUF tensors (float32, before rounding) that llama.cpp's gpt2 or llama architecture needs."""
    cfg = model.cfg
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    q, kv, hidden = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.mlp_hidden
    out = {"token_embd.weight": sd["wte.weight"], "output_norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    if cfg.pos_embedding == "rope":
        for i in range(cfg.n_layer):
            b, g = f"blocks.{i}.", f"blk.{i}."
            out[g + "attn_norm.weight"], out[g + "ffn_norm.weight"] = sd[b + "norm1.weight"], sd[b + "norm2.weight"]
            for s in ("weight", "bias") if cfg.bias else ("weight",):
                qkv, fc = sd[f"{b}attn.qkv.{s}"], sd[f"{b}mlp.fc.{s}"]
                out[f"{g}attn_q.{s}"] = _rope_rows(qkv[:q], cfg.n_head)
                out[f"{g}attn_k.{s}"] = _rope_rows(qkv[q:q + kv], cfg.kv_heads)
                out[f"{g}attn_v.{s}"] = qkv[q + kv:]
                out[f"{g}attn_output.{s}"] = sd[f"{b}attn.proj.{s}"]
                out[f"{g}ffn_gate.{s}"], out[f"{g}ffn_up.{s}"] = fc[:hidden], fc[hidden:]
                out[f"{g}ffn_down.{s}"] = sd[f"{b}mlp.proj.{s}"]
        return out
    out["position_embd.weight"] = sd["wpe.weight"]
    ours = {"attn_norm": "norm1", "attn_qkv": "attn.qkv", "attn_output": "attn.proj", "ffn_norm": "norm2",
            "ffn_up": "mlp.fc", "ffn_down": "mlp.proj"}
    names = [(f"blk.{i}.{g}", f"blocks.{i}.{o}") for i in range(cfg.n_layer) for g, o in ours.items()]
    for g, o in [*names, ("output_norm", "norm_f")]:
        out[g + ".weight"] = sd[o + ".weight"]
        # llama.cpp's gpt2 requires every bias: a bias-free model's are zeros.
        out[g + ".bias"] = sd.get(o + ".bias", np.zeros(sd[o + ".weight"].shape[0], dtype=np.float32))
    return out


def _read_raw(path) -> tuple[gguf.GGUFReader, dict[str, tuple[Q, np.ndarray]]]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def _from_file(cfg: ModelConfig, path) -> GPT:
    """Our model holding the file's (fp16-rounded) weights: comparing with it compares the computation alone."""
    model = GPT(cfg).eval()
    own = model.state_dict()  # a bias-free GPT-2 file also holds zero biases, which it has no place for
    model.load_state_dict({k: torch.from_numpy(v) for k, v in read_gguf(path)[1].items() if k in own})
    return model


def _rounded(w: np.ndarray) -> np.ndarray:
    """What F16 (matrices) or F32 (vectors) storage gives back."""
    return w.astype(np.float16 if w.ndim > 1 else np.float32).astype(np.float32)


@pytest.mark.parametrize("overrides", [{}, {"bias": True, "tie_embeddings": True}], ids=["untied", "bias-tied"])
def test_llama_f16_round_trip(tmp_path, tok, overrides):
    # A padded embedding (4 rows the tokenizer never produces) and grouped-query attention.
    cfg = _cfg(tok, "llama-tiny", n_kv_head=2, vocab_size=tok.vocab_size + 4, **overrides)
    model = _model(cfg)
    path = export_gguf(model, tok, tmp_path / "m.gguf", chat_template=TEMPLATE)
    reader, raw = _read_raw(path)

    expected = _expected(model)
    assert set(raw) == set(expected)  # tied: no output.weight (llama.cpp falls back to token_embd)
    for name, want in expected.items():
        ggml_type, got = raw[name]
        assert ggml_type == (Q.F32 if want.ndim == 1 else Q.F16), name
        np.testing.assert_array_equal(got, _rounded(want), err_msg=name)

    def field(key: str):
        return reader.get_field(key).contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert (field("llama.block_count"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv")) == (2, 4, 2)
    assert (field("llama.context_length"), field("llama.embedding_length"), field("llama.feed_forward_length"),
            field("llama.rope.dimension_count"), field("llama.vocab_size")) == (64, 64, cfg.mlp_hidden, 16,
                                                                                 cfg.vocab_size)
    assert field("llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps, rel=1e-6)
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert tokens == [tok.id_to_token(i) for i in range(tok.vocab_size)] + [f"[PAD{i}]" for i in
                                                                            range(tok.vocab_size, cfg.vocab_size)]
    assert types[tok.eot_id] == gguf.TokenType.CONTROL
    assert types[tok.vocab_size:] == [gguf.TokenType.UNUSED] * 4
    assert types.count(gguf.TokenType.NORMAL) == tok.vocab_size - 1
    assert len(field("tokenizer.ggml.merges")) == len(json.loads(tok.hf.to_str())["model"]["merges"])
    for key in ("bos", "eos", "eot"):
        assert field(f"tokenizer.ggml.{key}_token_id") == tok.eot_id
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == TEMPLATE

    meta, tensors = read_gguf(path)
    assert meta["llama.block_count"] == 2 and meta["tokenizer.chat_template"] == TEMPLATE
    sd = model.state_dict()
    assert set(tensors) == set(sd)
    for name, want in sd.items():
        np.testing.assert_array_equal(tensors[name], _rounded(want.numpy()), err_msg=name)


def _rope_pairs(v: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's normal RoPE on (T, heads, d): pair (2j, 2j + 1) rotated by pos * theta^(-2j/d)."""
    T, _, d = v.shape
    angle = np.arange(T)[:, None, None] * theta ** (-2 * np.arange(d // 2) / d)
    even, odd = v[..., 0::2], v[..., 1::2]
    out = np.empty_like(v)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def test_rope_order_gives_llama_cpp_the_same_attention_scores(tmp_path, tok):
    cfg = _cfg(tok, "llama-tiny", n_kv_head=2, rope_theta=500.0)
    model = _model(cfg, scale=0.1)
    _, raw = _read_raw(export_gguf(model, tok, tmp_path / "m.gguf"))
    T, H, K, hd = 12, cfg.n_head, cfg.kv_heads, cfg.head_dim
    x = torch.randn(T, cfg.n_embd)

    # Ours: the fp16-rounded projections (what the file holds), then rotate-half RoPE.
    w = model.blocks[0].attn.qkv.weight.detach().half().float()
    q = (x @ w[:H * hd].T).view(T, H, hd).transpose(0, 1)
    k = (x @ w[H * hd:(H + K) * hd].T).view(T, K, hd).transpose(0, 1)
    cos, sin = (c[:T] for c in rope_cache(cfg))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin).repeat_interleave(H // K, dim=0)
    ours = (q @ k.transpose(1, 2)).numpy()

    xs = x.numpy().astype(np.float64)
    gq = _rope_pairs((xs @ raw["blk.0.attn_q.weight"][1].T).reshape(T, H, hd), cfg.rope_theta)
    gk = _rope_pairs((xs @ raw["blk.0.attn_k.weight"][1].T).reshape(T, K, hd), cfg.rope_theta)
    theirs = np.einsum("thd,shd->hts", gq, np.repeat(gk, H // K, axis=1))
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)


def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """(T, vocab) logits of llama.cpp's gpt2 or llama graph (llama-model.cpp, src/models/*.cpp), written out in
    float64 numpy from the file alone: its tensors and the hyperparameters its metadata gives."""
    reader, raw = _read_raw(path)
    arch = reader.get_field("general.architecture").contents()

    def field(key: str):
        return reader.get_field(f"{arch}.{key}").contents()

    t = {name: v.astype(np.float64) for name, (_, v) in raw.items()}
    H, K, T = field("attention.head_count"), field("attention.head_count_kv"), len(ids)
    x = t["token_embd.weight"][ids]
    hd = x.shape[1] // H

    def linear(v: np.ndarray, name: str) -> np.ndarray:
        return v @ t[name + ".weight"].T + t.get(name + ".bias", 0.0)

    def norm(v: np.ndarray, name: str) -> np.ndarray:
        if arch == "llama":  # RMS norm
            return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + field("attention.layer_norm_rms_epsilon")) \
                * t[name + ".weight"]
        c = v - v.mean(-1, keepdims=True)
        return c / np.sqrt((c ** 2).mean(-1, keepdims=True) + field("attention.layer_norm_epsilon")) \
            * t[name + ".weight"] + t[name + ".bias"]

    if arch == "gpt2":
        x = x + t["position_embd.weight"][:T]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(field("block_count")):
        b = f"blk.{i}."
        h = norm(x, b + "attn_norm")
        if arch == "gpt2":  # fused: views of n_head, n_head_kv, n_head_kv heads
            q, k, v = np.split(linear(h, b + "attn_qkv"), [H * hd, (H + K) * hd], axis=1)
        else:
            q, k, v = linear(h, b + "attn_q"), linear(h, b + "attn_k"), linear(h, b + "attn_v")
        q, k, v = q.reshape(T, H, hd), k.reshape(T, K, hd), v.reshape(T, K, hd)
        if arch == "llama":
            q, k = _rope_pairs(q, field("rope.freq_base")), _rope_pairs(k, field("rope.freq_base"))
        # ggml broadcasts key/value head h // (H / K) to query head h.
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + causal
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + linear(np.einsum("hts,shd->thd", p, v).reshape(T, H * hd), b + "attn_output")
        h = norm(x, b + "ffn_norm")
        if arch == "gpt2":  # ggml_gelu: the tanh approximation
            u = linear(h, b + "ffn_up")
            h = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        else:  # SwiGLU: silu(gate) * up
            g = linear(h, b + "ffn_gate")
            h = g / (1 + np.exp(-g)) * linear(h, b + "ffn_up")
        x = x + linear(h, b + "ffn_down")
    return norm(x, "output_norm") @ t.get("output.weight", t["token_embd.weight"]).T  # absent: the embedding


@pytest.mark.parametrize("preset, overrides, rtol", [
    ("llama-tiny", {"n_kv_head": 2}, 1e-5),
    ("llama-tiny", {"bias": True, "tie_embeddings": True}, 1e-5),
    ("gpt2-tiny", {"mlp": "gelu_tanh", "n_kv_head": 2}, 1e-5),
    # Exact GELU runs as llama.cpp's tanh approximation: the logits differ a little, not by a misplaced tensor.
    ("gpt2-tiny", {"bias": False, "tie_embeddings": False}, 1e-3),
], ids=["llama-gqa", "llama-bias-tied", "gpt2-tanh-gqa", "gpt2-exact-gelu"])
def test_file_computes_our_logits(tmp_path, tok, preset, overrides, rtol):
    cfg = _cfg(tok, preset, **overrides)
    path = export_gguf(_model(cfg, scale=0.1), tok, tmp_path / "m.gguf")
    ref = _from_file(cfg, path)
    ids = tok.encode(TEXTS[0])[:24]
    with torch.no_grad():
        ours = ref(torch.tensor([ids]))[0][0].double().numpy()
    theirs = _llama_cpp_logits(path, ids)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=rtol * np.abs(ours).max())


def _q8_0_bound(w: np.ndarray) -> np.ndarray:
    """Q8_0, per block of 32: d = amax / 127, q = round(x / d), stored x' = q * fp16(d), so
    |x - x'| <= d/2 + |q| |d - fp16(d)| <= d/2 + 127 |d - fp16(d)|."""
    b = w.reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    bound = d / 2 + 127 * np.abs(d - d.astype(np.float16).astype(np.float32))
    return np.broadcast_to(bound * (1 + 1e-5) + 1e-9, b.shape).reshape(w.shape)


def _q4_0_bound(w: np.ndarray) -> np.ndarray:
    """Q4_0, per block of 32: m = the value of largest magnitude, d = m / -8, q = min(15, trunc(x / d + 8.5)),
    stored x' = (q - 8) fp16(d). x / d lies in [-8, 8]; rounding it costs |d| / 2, except where x / d >= 7.5
    (values of the sign opposite to m, near -m), which clip to 7 and cost |x - 7d| (at most |d|); the fp16 scale
    adds |q - 8| |d - fp16(d)| <= 8 |d - fp16(d)|."""
    b = w.reshape(-1, 32)
    m = np.take_along_axis(b, np.abs(b).argmax(axis=1, keepdims=True), axis=1)
    d = m / np.float32(-8)
    r = b / np.where(d == 0, 1, d)
    ideal = np.where(r >= 7.5, np.abs(b - 7 * d), np.abs(d) / 2)
    bound = ideal + 8 * np.abs(d - d.astype(np.float16).astype(np.float32))
    return (bound * (1 + 1e-5) + 1e-9).reshape(w.shape)


@pytest.mark.parametrize("qtype, tied", [("q8_0", False), ("q4_0", False), ("q4_0", True)],
                         ids=["q8_0", "q4_0", "q4_0-tied"])
def test_quantized_tensors_within_format_bounds(tmp_path, tok, qtype, tied):
    # ffn_down's rows of 80 are no whole number of 32-blocks: llama.cpp's converter writes those F16.
    cfg = _cfg(tok, "llama-tiny", intermediate_size=80, tie_embeddings=tied)
    head = "token_embd.weight" if tied else "output.weight"
    model = _model(cfg)
    path = export_gguf(model, tok, tmp_path / "m.gguf", qtype)
    reader, raw = _read_raw(path)
    assert reader.get_field("general.file_type").contents() == {"q8_0": 7, "q4_0": 2}[qtype]
    quant = Q.Q8_0 if qtype == "q8_0" else Q.Q4_0
    seen = set()
    for name, want in _expected(model).items():
        ggml_type, got = raw[name]
        if want.ndim == 1 or want.shape[-1] % 32:
            assert ggml_type == (Q.F32 if want.ndim == 1 else Q.F16), name
            np.testing.assert_array_equal(got, _rounded(want), err_msg=name)
            continue
        # q4_0 keeps the output head at Q8_0, as llama.cpp's quantizer gives it more bits.
        assert ggml_type == (Q.Q8_0 if name == head else quant), name
        bound = (_q8_0_bound if ggml_type == Q.Q8_0 else _q4_0_bound)(want)
        err = np.abs(got - want)
        assert (err <= bound).all(), f"{name}: error {err.max():.3g} above the bound {bound.max():.3g}"
        seen.add(ggml_type)
    assert seen == {Q.Q8_0, quant} and raw["blk.0.ffn_down.weight"][0] == Q.F16
    _, tensors = read_gguf(path)
    assert {k: v.shape for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("overrides", [{}, dict(bias=False, n_kv_head=2, tie_embeddings=False, mlp="gelu_tanh")],
                         ids=["gpt2", "no-bias-gqa-untied"])
def test_gpt2_f16_round_trip(tmp_path, tok, overrides):
    cfg = _cfg(tok, "gpt2-tiny", block_size=48, **overrides)
    model = _model(cfg)
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    reader, raw = _read_raw(path)
    expected = _expected(model)
    assert set(raw) == set(expected)
    for name, want in expected.items():
        ggml_type, got = raw[name]
        # llama.cpp's converter keeps the position table F32, like every vector.
        assert ggml_type == (Q.F32 if want.ndim == 1 or name == "position_embd.weight" else Q.F16), name
        want = want if ggml_type == Q.F32 else _rounded(want)
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert raw["position_embd.weight"][1].shape == (48, 64)

    def field(key: str):
        return reader.get_field(key).contents()

    assert field("general.architecture") == "gpt2"
    assert (field("gpt2.context_length"), field("gpt2.block_count"), field("gpt2.attention.head_count"),
            field("gpt2.attention.head_count_kv"), field("gpt2.feed_forward_length")) == (48, 2, 4, cfg.kv_heads,
                                                                                          256)
    assert field("gpt2.attention.layer_norm_epsilon") == pytest.approx(cfg.norm_eps, rel=1e-6)
    assert reader.get_field("gpt2.rope.freq_base") is None

    _, tensors = read_gguf(path)
    sd = model.state_dict()
    for name, want in sd.items():
        np.testing.assert_array_equal(tensors[name], _rounded(want.numpy()) if name != "wpe.weight"
                                      else want.numpy(), err_msg=name)
    extra = set(tensors) - set(sd)  # the zero biases a bias-free model's file holds
    assert all(name.endswith(".bias") and not tensors[name].any() for name in extra)
    assert bool(extra) == (not cfg.bias)


def test_special_tokens_and_turn_end(tmp_path, tok):
    hf = Tokenizer.from_str(tok.to_str()).hf
    hf.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    hf.add_tokens([AddedToken("<tool>", special=False)])
    chat_tok = Tokenizer(hf)
    end, tool = chat_tok.token_to_id("<|im_end|>"), chat_tok.token_to_id("<tool>")
    cfg = _cfg(chat_tok, "llama-tiny")
    path = export_gguf(_model(cfg), chat_tok, tmp_path / "m.gguf", chat_template=TEMPLATE, turn_end="<|im_end|>")
    meta, _ = read_gguf(path)
    types = meta["tokenizer.ggml.token_type"]
    assert (types[end], types[tool], types[chat_tok.eot_id]) == (gguf.TokenType.CONTROL,
                                                                   gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL)
    assert meta["tokenizer.ggml.eot_token_id"] == end and meta["tokenizer.ggml.eos_token_id"] == chat_tok.eot_id


def test_accepted_presets():
    assert all(from_dict(ModelConfig, {"preset": p}).export_problem() is None for p in PRESETS)


@pytest.mark.parametrize("case, words", [
    ("qk_norm", "qk_norm=true is neither GPT-2"),
    ("softcap", "logit_softcap=30 is neither GPT-2"),
    ("relu2", "mlp=relu2 is neither GPT-2"),
    ("rope-layernorm", "pos_embedding=rope, norm=layernorm, mlp=swiglu is neither GPT-2"),
    ("qtype", "GGUF type 'q5_k'"),
    ("q4_0-width", "model.n_embd=48 is no multiple of 32"),
    ("exists", "already exists"),
    ("char-tokenizer", "WordLevel"),
    ("foreign-tensor", "'blocks.0.attn.qkv.scales'"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, tok, case, words):
    overrides = {"qk_norm": {"qk_norm": True}, "softcap": {"logit_softcap": 30.0}, "relu2": {"mlp": "relu2"},
                 "rope-layernorm": {"norm": "layernorm"}}.get(case, {})
    tokenizer = Tokenizer.train_char(TEXTS) if case == "char-tokenizer" else tok
    cfg = _cfg(tokenizer, "llama-tiny", **overrides, **({"n_embd": 48} if case == "q4_0-width" else {}))
    out = tmp_path / "m.gguf"
    if case == "exists":
        out.write_bytes(b"keep me")
    model = GPT(cfg)
    if case == "foreign-tensor":  # what a quantized layer holds instead of its weight
        model.blocks[0].attn.qkv.register_buffer("scales", torch.ones(3))
    before = sorted(tmp_path.iterdir())
    with pytest.raises(UserError) as e:
        export_gguf(model, tokenizer, out, {"qtype": "q5_k", "q4_0-width": "q4_0"}.get(case, "f16"))
    message = str(e.value)
    assert words in message and "\n" not in message
    assert sorted(tmp_path.iterdir()) == before
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    if overrides:  # the missing piece and the preset that has it: the words transformers' export uses too
        assert cfg.export_problem() in message and message.endswith(", so llama.cpp cannot run it")


def test_read_gguf_refuses_other_files(tmp_path, tok):
    path = export_gguf(_model(_cfg(tok, "llama-tiny")), tok, tmp_path / "m.gguf")
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:-100])
    (tmp_path / "text.gguf").write_text("not a model")
    for name in ("cut.gguf", "text.gguf", "absent.gguf"):
        with pytest.raises(UserError, match=name):
            read_gguf(tmp_path / name)


def _header(tensor_count: int, kv_count: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "it is empty"),
    (b"GGU", r"at byte 0 expected the magic 'GGUF' \(4 bytes\), found the end of the file \(3 bytes\)"),
    (_header(0, 5), r"at byte 16 expected a kv_count whose items \(at least 13 bytes each\) fit in the 0 bytes left, "
                    r"found 5"),
    (_header(0, 2**64 - 1), "at byte 16 expected a kv_count .* found 18,446,744,073,709,551,615"),
    (_header(2**40, 0), "at byte 8 expected a tensor_count .* found 1,099,511,627,776"),
    (_header(0, 1) + struct.pack("<Q", 2**50) + b"k" * 20,
     "at byte 24 expected a length of a metadata key whose items"),
    (_header(0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 0, 2**61),
     "at byte 41 expected a length of the value of 'k' whose items \\(at least 1 bytes each\\)"),
    (_header(0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 13) + b"x",
     "at byte 33 expected a GGUF value type for the value of 'k'.*found 13"),
    (_header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQQIQ", 2, 64, 2**40, 0, 0),
     "at byte 96 expected the 281,474,976,710,656 bytes of tensor 't'"),  # F32: 64 x 2^40 x 4 bytes
    (_header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 64, 14, 0),
     "at byte 45 expected a tensor type .* found 14")],
    ids=["empty", "3-bytes", "24-bytes", "huge-kv-count", "huge-tensor-count", "huge-key", "huge-array",
         "bad-value-type", "tensor-past-the-end", "unread-tensor-type"])
def test_read_gguf_refuses_a_damaged_header_in_one_line_naming_the_offset(tmp_path, data, message):
    (tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(UserError, match=rf"'.*bad.gguf' is not a valid GGUF file: {message}") as e:
        read_gguf(tmp_path / "bad.gguf")
    assert "\n" not in str(e.value)


def test_read_gguf_on_every_truncation_and_byte_flip_of_a_real_export_returns_or_is_one_line(tmp_path, tok):
    path = export_gguf(_model(_cfg(tok, "gpt2-tiny", n_layer=1, n_embd=32, n_head=2)), tok, tmp_path / "m.gguf")
    good = path.read_bytes()
    reader = gguf.GGUFReader(path)
    header = reader.data_offset
    damaged = tmp_path / "damaged.gguf"

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @hypothesis.given(cut=st.integers(0, len(good) - 1), at=st.integers(0, header - 1), bits=st.integers(1, 255))
    def check(cut: int, at: int, bits: int) -> None:
        flipped = bytearray(good)
        flipped[at] ^= bits
        for data in (good[:cut], bytes(flipped)):
            damaged.write_bytes(data)
            try:
                read_gguf(damaged)
            except UserError as e:
                assert "\n" not in str(e) and "damaged.gguf" in str(e)

    check()


def test_failed_write_leaves_no_file_and_removes_what_a_killed_export_left(tmp_path, tok, monkeypatch):
    ended = subprocess.Popen(["true"])
    ended.wait()
    (tmp_path / f".m.gguf.tmp{ended.pid}").write_bytes(b"GGUF")  # the half file of an export killed mid-write

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # Fails after the header and metadata are on disk, in the temporary file.
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(StorageError, match="No space left"):
        export_gguf(_model(_cfg(tok, "llama-tiny")), tok, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_llama_cpp_greedy_tokens_match_lmforge(tmp_path, tok, preset):
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed: pip install llama-cpp-python to run the exported file "
                    "in llama.cpp itself")
    cfg = _cfg(tok, preset)
    # Larger weights than an initialisation: logits far apart, so fp16 arithmetic rarely meets a near-tie.
    path = export_gguf(_model(cfg, scale=0.2), tok, tmp_path / "m.gguf")
    ref = _from_file(cfg, path)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=cfg.block_size, n_threads=2, verbose=False)
    prompt = "hello world, the quick"
    ids = tok.encode(prompt)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids

    ours = generate(ref, [ids], 20, temperature=0)[0]
    theirs = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:  # acceptable only where our own logits nearly tie (llama.cpp computes in fp16)
            logits = ref(torch.tensor([ids + ours[:step]]))[0][0, -1]
            assert (logits[a] - logits[b]).item() < 1e-2 * logits.std().item(), (step, ours, theirs)
            break
