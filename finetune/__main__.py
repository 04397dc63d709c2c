"""`python -m hf_relattn.finetune` / `accelerate launch -m hf_relattn.finetune`."""

import sys

from .train import main

sys.exit(main())
