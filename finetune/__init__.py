"""Continued training of converted models with Accelerate (+ PEFT LoRA).

    accelerate launch -m hf_relattn.finetune --model SRC --variant NAME --data FILE --output DIR
    python -m hf_relattn.finetune --config finetune/recipes/gqa_uptrain.yaml

See `train.py` for the loop, `args.py` for every option (`--help`), `hf_relattn.data` for formats,
`recipes/` for ready-made runs and `accelerate_configs/` for launch set-ups.
"""

from .train import main, run

__all__ = ["main", "run"]
