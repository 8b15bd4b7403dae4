"""The whole loop learns: the default config (SE-ResNet-20 on the embedded digits, its
optimiser, schedule and augmentation) trained for a short budget reaches a test accuracy
far above chance (10 classes: 0.10)."""

from __future__ import annotations

from configs import default as default_config
from train import trainer

# 240 of the config's 440 steps (cosine over the shorter budget); its warm-up, learning
# rate, batch and augmentation are left as they are.
STEPS = 240


def test_default_config_learns_the_digits(tmp_path):
  config = default_config.get_config()
  config.num_train_steps = STEPS
  config.eval_every_steps = 0
  config.checkpoint_every_steps = STEPS
  config.progress_bar = config.plot_curves = config.attention_png = False
  results = trainer.train_and_evaluate(config, str(tmp_path))
  print(f"test accuracy after {STEPS} steps: {results['test_accuracy']:.4f}")
  assert results["steps"] == STEPS and results["eval_examples"] == 360
  assert results["test_accuracy"] >= 0.90, results
