"""Helpers shared by the convolution tests (tests/ops/test_convolution.py, test_banded.py)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

NHWC = ("NHWC", "HWIO", "NHWC")


def conv_loss(conv_fn, x, k, strides, padding, **kw):
  """A scalar read-out of ``conv_fn``'s output, non-linear so that the output gradient
  differs at every position."""
  y = conv_fn(x, k, strides, padding, dimension_numbers=kw.pop("dn", NHWC), **kw)
  return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)


def random_pair(shape_x, shape_k, dtype=jnp.float32, seed=0):
  """A normal input and kernel of these shapes."""
  kx, kk = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, shape_x, dtype), jax.random.normal(kk, shape_k, dtype))


def library_ops(compiled_text: str) -> set[str]:
  """The HLO opcodes inside the library (YNNPACK) fusions of a compiled executable's text."""
  bodies, name, lines = {}, None, []
  for line in compiled_text.splitlines():
    head = re.match(r"(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
    if head:
      name, lines = head.group(1), []
    elif line == "}" and name is not None:
      bodies[name], name = lines, None
    elif name is not None:
      lines.append(line)
  ops = set()
  for body in bodies.values():
    for line in body:
      if "__ynn_fusion" in line:
        called = re.search(r"calls=%([\w.\-]+)", line).group(1)
        ops |= {m.group(1) for l in bodies[called]
                for m in [re.search(r"= \S+ ([a-z\-]+)\(", l)] if m}
  return ops
