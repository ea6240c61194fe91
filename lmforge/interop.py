"""Hugging Face `transformers` interop, in memory: configs and weights both ways.

GPT-2 style models map to ``GPT2LMHeadModel``, Llama style ones to ``LlamaForCausalLM``; Mistral
and Qwen2 configs (Llama-shaped, with their own theta/GQA/bias choices) import too. Our fused
projections split into HF's separate ones: ``qkv`` rows are [q; k; v], a SwiGLU ``fc`` is
[gate; up]. GPT-2's ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``. Our
RoPE uses HF Llama's 'rotate half' layout, so no permutation of q/k is needed. GPT-2 has no
grouped-query attention: a GPT-2-style model with fewer key/value heads exports with each key/value
head repeated for its query heads (the same function, as multi-head attention).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from lmforge.config import ModelConfig, TrainConfig, save_yaml
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.model.gpt import GPT

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")
_GELU = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


def is_gpt2_style(cfg: ModelConfig) -> bool:
    return cfg.pos_embedding == "learned"


def hf_config(cfg: ModelConfig):
    """The ``transformers`` config of the same architecture (GPT2Config or LlamaConfig)."""
    from transformers import GPT2Config, LlamaConfig

    if is_gpt2_style(cfg):
        if cfg.norm != "layernorm" or cfg.mlp == "swiglu":
            raise UserError("model: GPT-2-style export needs norm=layernorm and a gelu MLP")
        return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_hidden,
                          activation_function=_GELU[cfg.mlp], layer_norm_epsilon=cfg.norm_eps,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None)
    if cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
        raise UserError("model: Llama-style export needs norm=rmsnorm and mlp=swiglu")
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                       rope_theta=cfg.rope_theta, max_position_embeddings=cfg.block_size,
                       tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias, mlp_bias=cfg.bias,
                       bos_token_id=None, eos_token_id=None)


def config_from_hf(hf) -> ModelConfig:
    """Our ModelConfig for a ``transformers`` config (GPT-2, Llama, Mistral, Qwen2)."""
    kind = getattr(hf, "model_type", None)
    if kind == "gpt2":
        act = hf.activation_function
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 activation_function '{act}' is not supported (gelu, gelu_new)")
        if not getattr(hf, "scale_attn_weights", True) or getattr(hf, "scale_attn_by_inverse_layer_idx", False):
            raise UserError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported "
                            "(scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True)")
        return ModelConfig(vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer,
                           n_head=hf.n_head, n_embd=hf.n_embd, intermediate_size=hf.n_inner or 4 * hf.n_embd,
                           pos_embedding="learned", norm="layernorm",
                           mlp="gelu" if act == "gelu" else "gelu_tanh", bias=True,
                           tie_embeddings=getattr(hf, "tie_word_embeddings", True),
                           norm_eps=hf.layer_norm_epsilon, dropout=0.0)
    if kind in ("llama", "mistral", "qwen2"):
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if head_dim * hf.num_attention_heads != hf.hidden_size:
            raise UserError(f"{kind}: head_dim {head_dim} x {hf.num_attention_heads} heads != hidden_size "
                            f"{hf.hidden_size} is not supported")
        act = getattr(hf, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UserError(f"{kind}: hidden_act '{act}' is not supported (only silu, i.e. SwiGLU)")
        scaling = getattr(hf, "rope_scaling", None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise UserError(f"{kind}: rope_scaling {scaling} is not supported (only unscaled RoPE)")
        theta = getattr(hf, "rope_theta", None) or (getattr(hf, "rope_parameters", None) or {}).get(
            "rope_theta", 10000.0)
        # One switch covers every linear layer here: Qwen2's q/k/v-only biases import with zero
        # biases elsewhere (from_hf_state_dict fills them), which computes the same function.
        bias = kind == "qwen2" or bool(getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False))
        # Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) equals full attention
        # on sequences no longer than the window: the context is capped there, which keeps it exact.
        block_size = hf.max_position_embeddings
        window = getattr(hf, "sliding_window", None)
        if window and getattr(hf, "use_sliding_window", True):
            block_size = min(block_size, window)
        return ModelConfig(vocab_size=hf.vocab_size, block_size=block_size,
                           n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
                           n_kv_head=hf.num_key_value_heads or hf.num_attention_heads, n_embd=hf.hidden_size,
                           intermediate_size=hf.intermediate_size, pos_embedding="rope", norm="rmsnorm",
                           mlp="swiglu", bias=bias, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
                           rope_theta=float(theta), norm_eps=hf.rms_norm_eps, dropout=0.0)
    raise UserError(f"unsupported Hugging Face model_type '{kind}' (supported: {', '.join(SUPPORTED)})")


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under ``transformers`` names (GPT2LMHeadModel or LlamaForCausalLM)."""
    cfg, sd = model.cfg, {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if is_gpt2_style(cfg):
        zeros, zeros_like = torch.zeros, torch.zeros_like  # GPT-2 always has biases: bias-free exports zeros
        out["transformer.wte.weight"] = sd["wte.weight"]
        out["transformer.wpe.weight"] = sd["wpe.weight"]
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[h + theirs + ".weight"] = sd[p + ours + ".weight"]
                out[h + theirs + ".bias"] = sd.get(p + ours + ".bias", zeros_like(sd[p + ours + ".weight"]))
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                w, b = sd[p + ours + ".weight"], sd.get(p + ours + ".bias")
                if ours == "attn.qkv" and cfg.kv_heads != cfg.n_head:
                    w, b = _expand_kv(cfg, w), None if b is None else _expand_kv(cfg, b)
                out[h + theirs + ".weight"] = w.t().contiguous()
                out[h + theirs + ".bias"] = b if b is not None else zeros(w.shape[0], dtype=w.dtype, device=w.device)
        out["transformer.ln_f.weight"] = sd["norm_f.weight"]
        out["transformer.ln_f.bias"] = sd.get("norm_f.bias", zeros_like(sd["norm_f.weight"]))
        out["lm_head.weight"] = sd["lm_head.weight"]
        return out
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out["model.embed_tokens.weight"] = sd["wte.weight"]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[p + "norm1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[p + "norm2.weight"]
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            wq, wk, wv = sd[f"{p}attn.qkv.{suffix}"].split([q, kv, kv])
            out[f"{h}self_attn.q_proj.{suffix}"] = wq
            out[f"{h}self_attn.k_proj.{suffix}"] = wk
            out[f"{h}self_attn.v_proj.{suffix}"] = wv
            out[f"{h}self_attn.o_proj.{suffix}"] = sd[f"{p}attn.proj.{suffix}"]
            gate, up = sd[f"{p}mlp.fc.{suffix}"].chunk(2)
            out[f"{h}mlp.gate_proj.{suffix}"] = gate
            out[f"{h}mlp.up_proj.{suffix}"] = up
            out[f"{h}mlp.down_proj.{suffix}"] = sd[f"{p}mlp.proj.{suffix}"]
    out["model.norm.weight"] = sd["norm_f.weight"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _expand_kv(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    """qkv rows (or bias) [q; k; v] with each key/value head repeated n_head // kv_heads times."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    wq, wk, wv = t.split([q, kv, kv])
    group = cfg.n_head // cfg.kv_heads

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(0, (cfg.kv_heads, cfg.head_dim)).repeat_interleave(group, dim=0).flatten(0, 1)

    return torch.cat([wq, rep(wk), rep(wv)])


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``transformers`` weights -> our state dict for a GPT built from ``cfg``."""
    def get(name: str) -> torch.Tensor:
        if name not in sd:
            raise UserError(f"Hugging Face weights lack '{name}' (is the folder complete?)")
        return sd[name]

    out: dict[str, torch.Tensor] = {}
    if is_gpt2_style(cfg):
        pre = "transformer." if "transformer.wte.weight" in sd else ""
        out["wte.weight"] = get(pre + "wte.weight")
        out["wpe.weight"] = get(pre + "wpe.weight")
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"{pre}h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[p + ours + ".weight"] = get(h + theirs + ".weight")
                out[p + ours + ".bias"] = get(h + theirs + ".bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                out[p + ours + ".weight"] = get(h + theirs + ".weight").t().contiguous()
                out[p + ours + ".bias"] = get(h + theirs + ".bias")
        out["norm_f.weight"] = get(pre + "ln_f.weight")
        out["norm_f.bias"] = get(pre + "ln_f.bias")
        out["lm_head.weight"] = sd.get("lm_head.weight", out["wte.weight"])
        return out
    out["wte.weight"] = get("model.embed_tokens.weight")
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out[p + "norm1.weight"] = get(h + "input_layernorm.weight")
        out[p + "norm2.weight"] = get(h + "post_attention_layernorm.weight")
        out[p + "attn.qkv.weight"] = torch.cat([get(f"{h}self_attn.{n}_proj.weight") for n in "qkv"])
        out[p + "attn.proj.weight"] = get(h + "self_attn.o_proj.weight")
        out[p + "mlp.fc.weight"] = torch.cat([get(h + "mlp.gate_proj.weight"), get(h + "mlp.up_proj.weight")])
        out[p + "mlp.proj.weight"] = get(h + "mlp.down_proj.weight")
        if cfg.bias:
            zeros = torch.zeros
            qkv_bias = [sd.get(f"{h}self_attn.{n}_proj.bias") for n in "qkv"]
            out[p + "attn.qkv.bias"] = torch.cat([
                b if b is not None else zeros(get(f"{h}self_attn.{n}_proj.weight").shape[0])
                for b, n in zip(qkv_bias, "qkv", strict=True)])
            out[p + "attn.proj.bias"] = sd.get(h + "self_attn.o_proj.bias", zeros(cfg.n_embd))
            out[p + "mlp.fc.bias"] = torch.cat([sd.get(h + "mlp.gate_proj.bias", zeros(cfg.mlp_hidden)),
                                                sd.get(h + "mlp.up_proj.bias", zeros(cfg.mlp_hidden))])
            out[p + "mlp.proj.bias"] = sd.get(h + "mlp.down_proj.bias", zeros(cfg.n_embd))
    out["norm_f.weight"] = get("model.norm.weight")
    out["lm_head.weight"] = sd.get("lm_head.weight", out["wte.weight"]) if cfg.tie_embeddings \
        else get("lm_head.weight")
    return out


def to_hf_model(model: GPT):
    """An eval-mode ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` holding a copy of our weights, on our
    model's device and in its dtype."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(hf_config(model.cfg))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


def from_hf_model(hf) -> GPT:
    """Our GPT holding a copy of a ``transformers`` causal LM's weights (fp32, eval mode)."""
    cfg = config_from_hf(hf.config)
    model = GPT(cfg)
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    model.load_state_dict(from_hf_state_dict(cfg, sd))
    return model.eval()


# --- folders in ``save_pretrained`` format

def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "config.yaml").is_file()


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors weights, sharded (with an index) or not."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise UserError(f"'{folder}' has no model.safetensors nor model.safetensors.index.json "
                        f"(only safetensors weights are read, never pickles)")
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise UserError(f"'{folder / shard}' is listed in the index but missing")
        sd.update(load_file(str(folder / shard)))
    return sd


def load_hf(source: str | Path) -> tuple[GPT, Tokenizer | None]:
    """Model (fp32, eval) and tokenizer from a local ``save_pretrained`` folder or a hub id.

    A hub id is downloaded by ``transformers`` (it needs the network); a folder is read directly.
    """
    from transformers import AutoConfig

    folder = Path(source)
    if not folder.is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            hf = AutoModelForCausalLM.from_pretrained(str(source), torch_dtype=torch.float32)
            tok_dir = AutoTokenizer.from_pretrained(str(source))
        except OSError as e:
            raise UserError(f"'{source}' is neither a local folder nor a reachable hub model ({e})") from None
        model = from_hf_model(hf)
        return model, Tokenizer.from_str(tok_dir.backend_tokenizer.to_str())
    try:
        hf_cfg = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        kind = json.loads((folder / "config.json").read_text()).get("model_type", "?") \
            if (folder / "config.json").is_file() else "?"
        if (folder / "config.json").is_file() and kind not in SUPPORTED:
            raise UserError(f"unsupported Hugging Face model_type '{kind}' (supported: {', '.join(SUPPORTED)})") \
                from None
        raise UserError(f"'{folder}': cannot read config.json ({e})") from None
    cfg = config_from_hf(hf_cfg)
    model = GPT(cfg)
    sd = {k: v.float() for k, v in _read_hf_weights(folder).items()}
    model.load_state_dict(from_hf_state_dict(cfg, sd))
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"'{folder / 'tokenizer.json'}' has {tokenizer.vocab_size} tokens but the model's "
                        f"vocabulary has {cfg.vocab_size}: they do not belong together")
    return model.eval(), tokenizer


def import_hf(source: str | Path, out_dir: str | Path) -> Path:
    """Write an HF model as an lmforge run directory (config.yaml, tokenizer.json, a checkpoint)."""
    from lmforge.train.checkpoint import save_weights_only

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' already exists and is not empty (nothing was overwritten)")
    model, tokenizer = load_hf(source)
    if tokenizer is None:
        raise UserError(f"'{source}' has no tokenizer.json (lmforge needs the fast-tokenizer file)")
    cfg = TrainConfig(out_dir=str(out), model=model.cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    tokenizer.save(out / "tokenizer.json")
    if Path(source).is_dir():
        from lmforge.finetune.sft import ChatTemplate, find_chat_template

        own = find_chat_template(Path(source))
        if own is not None:  # keep the model's own chat format for SFT and `generate --chat`
            ChatTemplate(own[0], tokenizer, own[1]).save(out)
    save_weights_only(out, 0, model)
    return out


def export_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path,
              chat_template: tuple[str, str | None] | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a folder that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load.

    chat_template: (Jinja template, end-of-answer token) of a chat model, for
    ``tokenizer.apply_chat_template``; generation then also stops at that token.
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' already exists and is not empty (nothing was overwritten)")
    if next(model.parameters()).dtype != torch.float32:  # export fp32 without changing the caller's model
        model = copy.deepcopy(model).float()
    hf = to_hf_model(model)
    eot = tokenizer.eot_id
    hf.config.bos_token_id = hf.config.eos_token_id = eot
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = eot
    hf.generation_config.pad_token_id = eot
    hf.save_pretrained(str(out), safe_serialization=True)
    eot_text = tokenizer.hf.id_to_token(eot)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, bos_token=eot_text, eos_token=eot_text,
                                   pad_token=eot_text, model_max_length=model.cfg.block_size)
    if chat_template is not None:
        template, turn_end = chat_template
        fast.chat_template = template
        turn_end_id = tokenizer.token_to_id(turn_end) if turn_end else None
        if turn_end_id is not None and turn_end_id != eot:
            hf.generation_config.eos_token_id = [eot, turn_end_id]
            hf.generation_config.save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out
