"""Fine-tuning a trained model: chat SFT (``sft``) and sequence classification (``classify``), full or
with LoRA, driven by ``loop.finetune`` on the training loop pretraining uses."""
