"""The training-step benchmark: ``python -m train.bench --help`` (flags in :mod:`.cli`).

Modules: ``common`` (timing, rounds, formatting, JSON; every other module imports it),
``models`` (the trainer's step per model), ``conv``, ``sampler``, ``pipeline``,
``cache`` (``--cache``: a JPEG folder trained end to end with and without ``data.cache``),
``profile``, ``torch_ref`` (the PyTorch twins) and ``cli``, which imports the rest.
What is measured, every JSON field and the results: docs/benchmarks.md.
"""
