"""Fine-tuning a trained model: chat SFT (``sft``), sequence classification (``classify``), LoRA
(``lora``), driven by ``loop.finetune`` and labelled with ``predict``."""
