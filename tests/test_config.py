from pathlib import Path

import pytest

from lmforge.config import RECIPES_DIR as PACKAGED_CONFIGS
from lmforge.config import (
    DataConfig,
    FinetuneConfig,
    TrainConfig,
    config_help,
    field_docs,
    load_finetune_config,
    load_train_config,
    merge_overrides,
    save_yaml,
)
from lmforge.errors import UserError
from lmforge.presets import PRESETS


def test_defaults_then_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  preset: gpt2-small\n  n_layer: 3\ntrain:\n  max_steps: 10\n")
    cfg = load_train_config(p, ["train.max_steps=20", "optim.lr=3e-4", "data.sources=[a.txt, b.txt]"])
    assert cfg.model.n_layer == 3 and cfg.model.n_embd == 384  # explicit key beats the preset
    assert cfg.train.max_steps == 20 and cfg.optim.lr == 3e-4
    assert cfg.data.sources == ["a.txt", "b.txt"]
    assert cfg.train.batch_size == TrainConfig().train.batch_size


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
    ("train.max_steps=abc", "config key 'train.max_steps': expected an integer, got 'abc'"),
    ("train.compile=maybe", "config key 'train.compile': expected true or false"),
    ("train.precision=fp8", "config key 'train.precision': expected one of"),
    ("train.activation_checkpointing=some",
     "config key 'train.activation_checkpointing': expected true or false or 'selective', got 'some'"),
    ("model.preset=gpt9", "unknown model preset 'gpt9'"),
    ("train=3", "config section 'train': expected a mapping"),
    ("nonsense", "expected key=value"),
    ("model.n_head=5", "n_embd=128 must be divisible by model.n_head=5"),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_train_config(PACKAGED_CONFIGS / "shakespeare-char.yaml", [override])


def test_none_and_floats_parse():
    cfg = load_train_config(None, ["train.patience=null", "train.max_minutes=1.5", "optim.decay_steps=none"])
    assert cfg.train.patience is None and cfg.train.max_minutes == 1.5 and cfg.optim.decay_steps is None


def test_a_key_of_a_boolean_or_a_word_takes_either():
    for value, parsed in (("true", True), ("false", False), ("selective", "selective")):
        assert load_train_config(None, [f"train.activation_checkpointing={value}"]).train.activation_checkpointing \
            == parsed


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_train_config(bad)


def test_overrides_do_not_mutate_input():
    data = {"train": {"max_steps": 1}}
    merge_overrides(data, ["train.max_steps=2"])
    assert data == {"train": {"max_steps": 1}}


@pytest.mark.parametrize("path", sorted(PACKAGED_CONFIGS.glob("*.yaml")), ids=lambda p: Path(p).stem)
def test_every_shipped_recipe_loads(path):
    cfg = load_train_config(path)
    assert cfg.train.max_steps > 0


def _leaf_fields(cls: type, prefix: str = ""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield cls, f.name, f"{prefix}{f.name}"


@pytest.mark.parametrize("cls", [TrainConfig, FinetuneConfig])
def test_every_config_key_has_a_one_line_docstring_that_help_prints(cls):
    help_text = "\n".join(config_help(cls))
    for owner, name, key in _leaf_fields(cls):
        doc = field_docs(owner).get(name)
        assert doc and "\n" not in doc, f"{key} has no docstring"
        if not key.startswith("model.") or cls is TrainConfig:
            assert f"  {key} = " in help_text and f"# {doc}" in help_text, key


def test_the_help_of_the_commands_comes_from_the_config_docstrings():
    from lmforge.cli import build_parser

    subcommands = build_parser()._subparsers._group_actions[0].choices
    train_help = subcommands["train"].format_help()
    assert "train.max_steps = 5000  # Optimizer steps to train for (with budget_minutes: the most it may plan)." \
        in train_help  # the default recipe's value
    finetune_help = subcommands["finetune"].format_help()
    assert "lora.rank = 0  # Rank of the adapters" in finetune_help
    assert "model.n_layer" not in finetune_help and "[model]" in finetune_help  # copied from the base
    prepare = subcommands["prepare"]
    args = prepare.parse_args(["--out", "o", "--vocab-size", "300", "--val-fraction", "0.2"])
    assert (args.vocab_size, args.val_fraction, args.workers) == (300, 0.2, DataConfig().workers)
    assert field_docs(DataConfig)["vocab_size"] in " ".join(prepare.format_help().split())


def test_finetune_refuses_model_keys_it_would_take_from_the_base(tmp_path):
    base = ["base=runs/x", "data.train=x.jsonl"]
    with pytest.raises(UserError, match="'model.dropout' cannot be set.*dropout=P"):
        load_finetune_config(None, [*base, "model.dropout=0.1"])
    assert load_finetune_config(None, [*base, "dropout=0.1"]).dropout == 0.1
    # A run's own config.yaml holds the base's model section: resuming reads it, overrides still count.
    saved = tmp_path / "config.yaml"
    save_yaml(load_finetune_config(None, base), saved)
    assert load_finetune_config(saved, ["train.max_steps=5"], resume=True).train.max_steps == 5
    with pytest.raises(UserError, match="'model.n_layer' cannot be set"):
        load_finetune_config(saved, ["model.n_layer=3"], resume=True)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "'optim.lr': expected a finite number > 0, got -1.0"),
    ("optim.lr=nan", "'optim.lr': expected a finite number > 0, got nan"),
    ("optim.beta2=1", "'optim.beta2': expected a number in [0, 1)"),
    ("train.batch_size=0", "'train.batch_size': expected a positive integer, got 0"),
    ("train.grad_accum=0", "'train.grad_accum'"),
    ("train.eval_interval=0", "'train.eval_interval'"),
    ("train.max_steps=-5", "'train.max_steps': expected a positive integer, got -5"),
    ("model.dropout=2", "'model.dropout': expected a probability in [0, 1), got 2.0"),
    ("model.block_size=1e8", "'model.block_size': expected at most 1,048,576"),
    ("sample.temperature=-1", "'sample.temperature'"),
    ("data.val_fraction=1.5", "data.val_fraction must be between 0 and 1"),
])
def test_values_that_pass_type_checks_but_make_no_sense_are_refused_at_load_time(override, message, tmp_path):
    with pytest.raises(UserError) as e:
        load_train_config(None, [override, f"out_dir={tmp_path / 'run'}"])
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["lora.alpha=0", "lora.dropout=1", "data.max_length=0", "dropout=1.5",
                                      "optim.weight_decay=-0.1", "train.patience=0",
                                      "data.packing=true task=seq2seq", "data.packing=true task=classify"])
def test_finetune_values_are_checked_by_meaning_too(override):
    with pytest.raises(UserError, match=override.split("=")[0]):
        load_finetune_config(None, ["base=runs/x", "data.train=x.jsonl", *override.split()])


@pytest.mark.parametrize("recipe", [None, *sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))])
def test_a_prepared_dataset_loads_with_every_recipe_and_a_data_override_it_makes_moot_names_both_keys(recipe):
    # The recipes set data.tokenizer / vocab_size / sources: those are what they prepare with, no conflict.
    assert load_train_config(recipe, ["data.dataset_dir=prepared"]).data.dataset_dir == "prepared"
    for override in ("data.tokenizer=char", "data.sources=[a.txt]", "data.vocab_size=512", "data.val_fraction=0.2"):
        key = override.split("=")[0]
        with pytest.raises(UserError) as error:
            load_train_config(recipe, [override, "data.dataset_dir=prepared"])
        assert str(error.value).startswith(f"'{key}' has no effect with data.dataset_dir='prepared'")
        assert "\n" not in str(error.value)


def test_a_resumed_run_whose_config_holds_sources_and_their_prepared_dataset_still_loads(tmp_path):
    # What train() saves: the recipe's sources, and the dataset it prepared from them.
    save_yaml(load_train_config("shakespeare-char", ["data.dataset_dir=runs/x/data"]), tmp_path / "config.yaml")
    cfg = load_train_config(tmp_path / "config.yaml", ["train.max_steps=4000", "out_dir=runs/x"])
    assert (cfg.data.sources, cfg.data.dataset_dir) == (["tinyshakespeare.txt"], "runs/x/data")
    with pytest.raises(UserError, match="^'data.tokenizer' has no effect with data.dataset_dir='runs/x/data'"):
        load_train_config(tmp_path / "config.yaml", ["data.tokenizer=bpe"])


@pytest.mark.parametrize(("preset", "changes"), [*((name, {}) for name in sorted(PRESETS)),
                                                 ("gpt2-tiny", {"bias": False}),
                                                 ("llama-tiny", {"n_kv_head": 1, "intermediate_size": 200}),
                                                 ("gpt2-tiny", {"mlp": "swiglu", "norm": "rmsnorm"}),
                                                 ("llama-tiny", {"arch": "encoder"}),
                                                 ("llama-tiny", {"arch": "encoder_decoder", "decoder_layers": 3})],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) or "-")
def test_the_parameter_count_from_the_shape_alone_is_the_models(preset, changes):
    import torch

    from lmforge.config import ModelConfig
    from lmforge.model import build_model

    cfg = ModelConfig(preset=preset, **{**PRESETS[preset], **changes, "vocab_size": 50})
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_model(cfg)
    embeddings = {"wte.weight", "wpe.weight", "wtt.weight", "enc_wpe.weight", "dec_wpe.weight", "lm_head.weight",
                  "lm_head.bias"}
    assert sum(p.numel() for name, p in model.named_parameters() if name not in embeddings) \
        == cfg.params_without_embeddings


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_named_over_a_recipe_gives_exactly_its_architecture_and_exports(preset):
    """The default recipe sets RoPE, RMSNorm and no biases after its own preset; a preset the user names replaces
    every architecture key (what the preset leaves out takes the default), so a GPT-2 preset is GPT-2."""
    from lmforge.config import ARCHITECTURE_KEYS, ModelConfig
    from lmforge.model.hf import hf_config

    model = load_train_config("default", [f"model.preset={preset}"]).model
    expected = ModelConfig(**PRESETS[preset])
    assert {k: getattr(model, k) for k in ARCHITECTURE_KEYS} == {k: getattr(expected, k) for k in ARCHITECTURE_KEYS}
    family = {"seq2seq": "bart"}.get(preset.split("-")[0], preset.split("-")[0])  # the presets' stem -> the family
    assert model.family.startswith(family + "-style: ")
    assert model.export_problem() is None and hf_config(model).model_type == family


def test_keys_after_a_preset_change_it_and_keys_before_it_do_not(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  n_layer: 9\n  bias: false\n  preset: gpt2-tiny\n  n_embd: 64\n  dropout: 0.1\n")
    model = load_train_config(p).model
    assert (model.n_layer, model.bias, model.n_embd, model.dropout) == (4, True, 64, 0.1)  # dropout: not architecture
    over = load_train_config(p, ["model.n_layer=2", "model.preset=llama-tiny", "model.n_kv_head=4"]).model
    assert (over.n_layer, over.n_embd, over.n_kv_head, over.family) == (4, 128, 4, "llama-style: rope, rmsnorm, swiglu")
    assert load_train_config("default").model.family == "llama-style: rope, rmsnorm, swiglu"


def test_a_step_count_asked_for_replaces_a_recipes_time_budget():
    budgeted = load_train_config(None, ["train.budget_minutes=3"])
    assert budgeted.train.budget_minutes == 3
    assert load_train_config(None, ["train.budget_minutes=3", "train.max_steps=50"]).train.budget_minutes == 3
    with_steps = load_train_config("default", ["train.max_steps=50"])
    assert (with_steps.train.max_steps, with_steps.train.budget_minutes) == (50, None)
