"""lmforge: from raw text to a trained GPT-style language model.

The public API::

    from lmforge import load_train_config, train, load_finetune_config, finetune, load_run, generate_text
    from lmforge import Sampling, GREEDY  # how generate_text draws tokens
    from lmforge import generate_targets, Search  # an encoder-decoder's targets for sources (beam search: Search)

    result = train(load_train_config("default", ["train.max_steps=100"]))  # a shipped recipe, by name

Names are imported on first use, so ``import lmforge.config`` does not pull in the trainer.
Token-level decoding is ``lmforge.generate.generate``.
"""

from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {
    "TrainConfig": "lmforge.config", "load_train_config": "lmforge.config", "FinetuneConfig": "lmforge.config",
    "load_finetune_config": "lmforge.config", "UserError": "lmforge.errors", "generate_text": "lmforge.generate",
    "LoadedRun": "lmforge.loading", "load_run": "lmforge.loading",
    "TrainResult": "lmforge.training.pretrain", "train": "lmforge.training.pretrain",
    "FinetuneResult": "lmforge.finetuning.finetune", "finetune": "lmforge.finetuning.finetune",
    "Sampling": "lmforge.options", "GREEDY": "lmforge.options", "Search": "lmforge.options",
    "generate_targets": "lmforge.generate_seq2seq",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
