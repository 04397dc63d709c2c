"""Continued training with Accelerate (`accelerate launch -m hf_relattn.finetune`): a later issue."""
