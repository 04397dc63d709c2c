"""Model-card templates for adapted checkpoints (package data: relattn_card.md)."""
