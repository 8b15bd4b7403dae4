"""Training application for attention_flax: configs in, checkpoints and metrics out."""
