"""Per-example gradient norms and the clipped gradient sum of DP-SGD.

DP-SGD needs, for a batch of B examples with gradients g_i, the clipped sum
sum_i m_i min(1, C / ||g_i||) g_i (m_i the example's mask). Two ways:

* `"vmap"`: materialise every g_i with `vmap(grad)`, in micro-batches that
  bound the memory to `microbatch_size` x (number of parameters) floats. Works
  for any model.
* `"ghost"`: never materialise g_i. One forward pass of the model records,
  for each Dense / Conv / Embed layer, its input a_i and (by one backward pass
  against zero perturbations added to its output) the gradient b_i of the
  example's loss with respect to its output. The layer's part of ||g_i||^2 is
  then ||a_i^T b_i||_F^2, computed as ||a_i||^2 ||b_i||^2 when the layer sees
  one position per example, and otherwise as <a_i a_i^T, b_i b_i^T> (the Gram
  or "ghost" form, cost T^2 (d_in + d_out) for T positions) or by forming
  a_i^T b_i (cost T d_in d_out), whichever is cheaper (the mixed rule);
  convolutions use their im2col patches as a_i, embeddings their one-hot
  token ids, whose Gram matrix is token equality. The clipped sum is then
  formed from the same a_i and b_i, with per-example weights
  w_i = m_i min(1, C / ||g_i||): the layer's kernel part is
  sum_i w_i a_i^T b_i, one matrix product over the batch, and its bias part
  sum_i w_i sum_t b_i,t. This is the book-keeping of Bu et al. (2023): no
  second backward pass, which would recompute every b_i scaled by w_i.

Both give the same numbers up to float rounding. Ghost norms need every
parameter of the model to belong to exactly one call of a `flax.linen` Dense,
Conv (ungrouped, zero padding) or Embed layer; `"auto"` uses them when that
holds and `"vmap"` otherwise. The forward pass runs under `vmap` over
examples in both methods, so example i's loss depends on example i alone
(a layer mixing examples, such as batch normalisation, sees a batch of one in
both), which is what the norm identities and the privacy analysis assume.

References:
  Goodfellow, "Efficient Per-Example Gradient Computations", arXiv:1510.01799, 2015.
  Li, Tramer, Liang, Hashimoto, "Large Language Models Can Be Strong
    Differentially Private Learners", ICLR 2022 (ghost clipping).
  Bu, Mao, Xu, "Scalable and Efficient Training of Large Convolutional Neural
    Networks with Differential Privacy", NeurIPS 2022 (mixed ghost clipping).
  Bu, Wang, Zha, Karypis, "Differentially Private Optimization on Large Model
    at Small Cost", ICML 2023 (book-keeping: the clipped sum without a second
    backward pass).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from fedjax_priv import tree as tree_util
from fedjax_priv.models import conv
from fedjax_priv.models.model import Model, example_losses
from fedjax_priv.privacy.clipping import clip_factor

CLIPPING_METHODS = ("auto", "ghost", "vmap")

# Per-example gradients held at once by the "vmap" method when no micro-batch
# size is given: 2^24 float32 values (64 MiB), so a 55k-parameter MLP takes a
# batch of 300 in one go and a 1.2M-parameter CNN 13 examples at a time.
_VMAP_BUDGET_FLOATS = 2 ** 24


class ClippedSum(NamedTuple):
  """The clipped gradient sum of one batch.

  Attributes:
    grad_sum: pytree like params: sum_i mask_i min(1, C / norms_i) g_i.
    losses: [B] float32 per-example losses (nats), masked or not.
    norms: [B] float32 per-example gradient L2 norms ||g_i||, before clipping.
  """
  grad_sum: Any
  losses: jax.Array
  norms: jax.Array


class _Call(NamedTuple):
  """One recorded call of a supported layer, for one example."""
  module: nn.Module      # the layer (its hyper-parameters)
  path: tuple[str, ...]  # where its params live in the params tree
  inputs: jax.Array      # its input (token ids for Embed)
  output: jax.Array      # its output, before the perturbation


def _unsupported_layer(module: nn.Module) -> str | None:
  """Why ghost norms cannot handle this layer, or None if they can."""
  kind = type(module)
  if kind is nn.Dense:
    if module.dot_general is not None or module.dot_general_cls is not None:
      return "a Dense with a custom dot_general"
    return None
  if kind is nn.Conv:
    if module.feature_group_count != 1:
      return f"a grouped Conv (feature_group_count={module.feature_group_count})"
    if module.mask is not None:
      return "a masked Conv"
    # models.conv computes the same forward convolution; only its VJP differs.
    if (module.conv_general_dilated not in (None, conv.conv_general_dilated)
        or module.conv_general_dilated_cls is not None):
      return "a Conv with a custom conv_general_dilated"
    if isinstance(module.padding, str) and module.padding not in ("SAME", "SAME_LOWER", "VALID"):
      return f"a Conv with padding {module.padding!r}"
    return None
  if kind is nn.Embed:
    return None
  return f"a {kind.__name__}"


def _forward(model, params, xi, yi, perturbations=None):
  """One example's loss, recording the calls of supported layers.

  Adding the zero `perturbations[k]` to the output of the k-th recorded call
  makes the loss gradient with respect to it the gradient with respect to
  that layer's output, b.

  Returns:
    (loss, calls, misused): misused maps the param path of a supported layer
    used other than by one plain `__call__` to the reason.
  """
  calls, misused, root = [], {}, []

  def interceptor(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    root.append(root[0] if root else module)
    if _unsupported_layer(module) is not None or method == "setup":
      return next_fun(*args, **kwargs)
    if module is not root[0] and not isinstance(module.parent, nn.Module):
      # A layer inside a flax lifted transform (nn.remat, nn.scan...) runs as
      # the root of a separate trace: what it records would escape that trace.
      # Its params stay uncovered and are materialised.
      return next_fun(*args, **kwargs)
    if method != "__call__" or len(args) != 1 or kwargs:
      misused[tuple(module.path)] = f"{type(module).__name__}.{method} with these arguments"
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    calls.append(_Call(module, tuple(module.path), args[0], out))
    if perturbations is not None:
      out = out + perturbations[len(calls) - 1]
    return out

  with nn.intercept_methods(interceptor):
    loss = example_losses(model, params, xi[None], yi[None])[0]
  return loss, calls, misused


class GhostCoverage(NamedTuple):
  """What ghost norms can do for one model and input shape.

  Attributes:
    error: why ghost norms cannot run at all (None when they can).
    ghost_fraction: share of the parameters whose norms come from ghost norms.
    materialised: "path: reason" for each parameter whose per-example
      gradients are materialised instead (not in a supported layer, or shared).
  """
  error: str | None
  ghost_fraction: float
  materialised: tuple[str, ...]


class _Plan(NamedTuple):
  calls: list[_Call]       # shapes only; output is a ShapeDtypeStruct
  ghost: list[bool]        # per call: does its ghost norm count?
  materialised: list[int]  # indices into the flattened params
  coverage: GhostCoverage


def _plan(model, params, x, y) -> _Plan:
  """Traces one example's forward on shapes (`jax.eval_shape`, no compile)."""
  found = {}

  def probe(params, xi, yi):
    _, calls, misused = _forward(model, params, xi, yi)
    found["calls"], found["misused"] = calls, misused
    return [c.output for c in calls]

  lifted = _Plan([], [], [], GhostCoverage(
      "a layer runs inside a flax lifted transform (nn.scan, nn.remat, ...)", 0.0, ()))
  try:
    outputs = jax.eval_shape(probe, params, jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                             jax.ShapeDtypeStruct(y.shape[1:], y.dtype))
  except jax.errors.UnexpectedTracerError:  # A recorded layer ran inside a lifted transform.
    return lifted
  calls = [c._replace(inputs=None, output=o) for c, o in zip(found["calls"], outputs)]
  reasons = dict(found["misused"])
  paths = [c.path for c in calls]
  reasons.update({p: "called more than once (shared weights)"
                  for p in paths if paths.count(p) > 1})
  ghost = [c.path not in reasons for c in calls]
  covered = {(*c.path, name) for c, g in zip(calls, ghost) if g for name in _param_names(c.module)}
  materialised, notes, ghost_size, total = [], [], 0, 0
  for index, (names, leaf) in enumerate(zip(_leaf_names(params), jax.tree.leaves(params))):
    total += math.prod(leaf.shape)
    if names in covered:
      ghost_size += math.prod(leaf.shape)
    else:
      materialised.append(index)
      notes.append(f"{'/'.join(names)}: "
                   f"{reasons.get(names[:-1], 'not in a flax Dense, Conv or Embed layer')}")
  plan = _Plan(calls, ghost, materialised,
               GhostCoverage(None, ghost_size / max(total, 1), tuple(notes)))
  return plan


def ghost_coverage(model: Model, params: Any, x: jax.Array, y: jax.Array) -> GhostCoverage:
  """Which parameters ghost norms cover for this model (traces shapes only, no compile).

  Args:
    model: the model; only `flax.linen` layers are recognised.
    params: its params (arrays or `jax.ShapeDtypeStruct`s).
    x: [B, *input_shape] inputs (arrays or shapes); y: [B] int32 labels.
  """
  return _plan(model, params, x, y).coverage


def _leaf_names(params) -> list[tuple[str, ...]]:
  """Each leaf's path in the params tree as names, in `jax.tree.leaves` order."""
  return [tuple(str(getattr(k, "key", k)) for k in key_path)
          for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _param_names(module: nn.Module) -> tuple[str, ...]:
  if isinstance(module, nn.Embed):
    return ("embedding",)
  return ("kernel", "bias") if module.use_bias else ("kernel",)


def _rows(module: nn.Module, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One example's layer input and output gradient as [T, d_in] and [T, d_out] rows.

  The layer's weight gradient for the example is rows_a^T rows_b (for Embed,
  rows_a holds the token ids [T] instead).
  """
  d_out = b.shape[-1]
  if isinstance(module, nn.Embed):
    # A one-row table is broadcast, not indexed: every token uses row 0.
    ids = a.reshape(-1) if module.num_embeddings > 1 else jnp.zeros(a.size, jnp.int32)
    return ids, b.reshape(-1, d_out)
  if isinstance(module, nn.Conv):
    kernel_size = _window(module)
    rank = len(kernel_size)
    per_axis = lambda v: (1,) * rank if v is None else (v,) * rank if isinstance(v, int) else v
    a = a.reshape(-1, *a.shape[-rank - 1:])  # Conv folds (or adds) leading batch axes alike.
    spatial = "HWD"[:rank]
    patches = jax.lax.conv_general_dilated_patches(
        a, kernel_size, per_axis(module.strides), canonicalize_padding(module.padding, rank),
        lhs_dilation=per_axis(module.input_dilation), rhs_dilation=per_axis(module.kernel_dilation),
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    return patches.reshape(-1, patches.shape[-1]), b.reshape(-1, d_out)
  return a.reshape(-1, a.shape[-1]), b.reshape(-1, d_out)


def _window(module: nn.Conv) -> tuple[int, ...]:
  """A convolution's kernel size as a tuple, one entry per spatial axis."""
  size = module.kernel_size
  return (size,) if isinstance(size, int) else tuple(size)


def _layer_sq_norm(module: nn.Module, a: jax.Array, b: jax.Array) -> jax.Array:
  """||gradient of this layer's params||^2 for one example (float32 scalar).

  a, b: the example's rows from `_rows`.
  """
  b = b.astype(jnp.float32)
  num_rows, d_out = b.shape
  sq = lambda v: jnp.sum(jnp.square(v))
  if isinstance(module, nn.Embed):
    if num_rows * num_rows < module.num_embeddings:  # Gram of one-hot ids: token equality.
      same = (a[:, None] == a[None, :]).astype(jnp.float32)
      return jnp.sum(same * (b @ b.T))
    return sq(jnp.zeros((module.num_embeddings, d_out), jnp.float32).at[a].add(b))
  a = a.astype(jnp.float32)
  d_in = a.shape[-1]
  bias = sq(jnp.sum(b, axis=0)) if module.use_bias else 0.0
  if num_rows == 1:
    kernel = sq(a) * sq(b)
  elif num_rows * (d_in + d_out) < d_in * d_out:  # Ghost (Gram) form is cheaper.
    kernel = jnp.sum((a @ a.T) * (b @ b.T))
  else:
    kernel = sq(a.T @ b)
  return kernel + bias


def _weighted_layer_gradients(module: nn.Module, rows_a: jax.Array, rows_b: jax.Array,
                              weights: jax.Array) -> dict[str, jax.Array]:
  """sum_i weights_i (example i's gradient of this layer's params), by param name (float32).

  rows_a, rows_b: every example's rows from `_rows`, [B, T, ...]; weights:
  [B]. The kernel part is rows_a^T (weights * rows_b) over all the batch's
  rows, the product the layer's backward pass would form.
  """
  rows_b = rows_b.astype(jnp.float32) * weights[:, None, None]
  rows_b = rows_b.reshape(-1, rows_b.shape[-1])
  if isinstance(module, nn.Embed):
    table = jnp.zeros((module.num_embeddings, rows_b.shape[-1]), jnp.float32)
    return {"embedding": table.at[rows_a.reshape(-1)].add(rows_b)}
  rows_a = rows_a.reshape(-1, rows_a.shape[-1])
  kernel = jnp.matmul(rows_a.T, rows_b.astype(rows_a.dtype),
                      preferred_element_type=jnp.float32)
  if isinstance(module, nn.Conv):
    # Patches order their features channel-major (C_in, *window); flax's
    # kernel is (*window, C_in, C_out).
    window = _window(module)
    channels = kernel.shape[0] // math.prod(window)
    kernel = kernel.reshape(channels, -1, kernel.shape[-1])
    kernel = jnp.moveaxis(kernel, 0, 1).reshape(*window, channels, kernel.shape[-1])
  grads = {"kernel": kernel}
  if module.use_bias:
    grads["bias"] = jnp.sum(rows_b, axis=0)
  return grads


def _ghost(model, params, x, y, mask, clip_norm, plan: _Plan) -> ClippedSum:
  """Ghost norms, plus per-example gradients of the parameters in `plan.materialised`.

  Those parameters enter each example's forward pass as a per-example copy
  [B, ...], so the one backward pass returns their per-example gradients;
  the shared parameters' batch gradient it would also return is not used
  (under jit, not computed): their clipped sum is book-kept per layer.
  """
  batch = x.shape[0]
  leaves, treedef = jax.tree.flatten(params)
  copies = [jnp.broadcast_to(leaves[i], (batch, *leaves[i].shape)) for i in plan.materialised]
  zeros = [jnp.zeros((batch, *c.output.shape), c.output.dtype) for c in plan.calls]

  def losses_fn(params, perturbations, copies):
    shared = jax.tree.leaves(params)

    def one(perturbation, copy, xi, yi):
      own = list(shared)
      for i, leaf in zip(plan.materialised, copy):
        own[i] = leaf
      loss, calls, _ = _forward(model, jax.tree.unflatten(treedef, own), xi, yi, perturbation)
      return loss, [c.inputs for c in calls]

    # Under vmap example i's loss depends on example i alone, as the norms assume.
    return jax.vmap(one)(perturbations, copies, x, y)

  losses, vjp, inputs = jax.vjp(losses_fn, params, zeros, copies, has_aux=True)
  _, output_grads, copy_grads = vjp(jnp.ones_like(losses))
  # Each ghost layer's rows (a convolution's im2col patches), formed once for
  # its norm and for its part of the clipped sum.
  layers = [(call, jax.vmap(lambda a, b, m=call.module: _rows(m, a, b))(a, b))
            for call, ghost, a, b in zip(plan.calls, plan.ghost, inputs, output_grads) if ghost]
  sq_norms = jnp.zeros((batch,), jnp.float32)
  for call, rows in layers:
    sq_norms += jax.vmap(lambda a, b, m=call.module: _layer_sq_norm(m, a, b))(*rows)
  for g in copy_grads:
    sq_norms += jnp.sum(jnp.square(g.reshape(batch, -1).astype(jnp.float32)), axis=1)
  norms = jnp.sqrt(sq_norms)
  if clip_norm is None:
    return ClippedSum(None, losses, norms)
  weights = (mask * clip_factor(norms, clip_norm)).astype(jnp.float32)
  grad_leaves = [None] * len(leaves)
  for i, g in zip(plan.materialised, copy_grads):
    grad_leaves[i] = jnp.tensordot(weights, g.astype(jnp.float32), 1)
  index = {names: i for i, names in enumerate(_leaf_names(params))}
  for call, rows in layers:
    for name, g in _weighted_layer_gradients(call.module, *rows, weights).items():
      grad_leaves[index[(*call.path, name)]] = g
  grad_leaves = [g.astype(leaf.dtype) for g, leaf in zip(grad_leaves, leaves)]
  return ClippedSum(jax.tree.unflatten(treedef, grad_leaves), losses, norms)


def _vmap(model, params, x, y, mask, clip_norm, microbatch_size):
  batch = x.shape[0]
  if microbatch_size is None:
    microbatch_size = max(1, min(batch, _VMAP_BUDGET_FLOATS // tree_util.num_parameters(params)))
  num_chunks = math.ceil(batch / microbatch_size)
  padded = num_chunks * microbatch_size
  # Padding slots get mask 0: they are computed and dropped.
  pad = lambda v: jnp.pad(v, [(0, padded - batch)] + [(0, 0)] * (v.ndim - 1))
  chunks = [pad(v).reshape(num_chunks, microbatch_size, *v.shape[1:]) for v in (x, y, mask)]
  one_loss = lambda p, xi, yi: example_losses(model, p, xi[None], yi[None])[0]

  def chunk_sum(total, chunk):
    xc, yc, mc = chunk
    losses, grads = jax.vmap(jax.value_and_grad(one_loss), in_axes=(None, 0, 0))(params, xc, yc)
    norms = jax.vmap(tree_util.l2_norm)(grads)
    if clip_norm is not None:
      # Clipping folded into the sum's weights: one dot product, no clipped copies.
      total = tree_util.add(total, tree_util.weighted_sum(mc * clip_factor(norms, clip_norm),
                                                          grads))
    return total, (losses, norms)

  init = tree_util.zeros_like(params) if clip_norm is not None else None
  total, (losses, norms) = jax.lax.scan(chunk_sum, init, chunks)
  return ClippedSum(total, losses.reshape(-1)[:batch], norms.reshape(-1)[:batch])


def _resolve(method, model, params, x, y) -> _Plan | None:
  """The ghost plan to run, or None for the vmap method."""
  if method not in CLIPPING_METHODS:
    raise ValueError(f"clipping must be one of {CLIPPING_METHODS}, got {method!r}")
  if method == "vmap":
    return None
  plan = _plan(model, params, x, y)
  if method == "ghost" and plan.coverage.error is not None:
    raise ValueError(f"clipping='ghost' cannot run on this model: {plan.coverage.error}")
  # Materialising most parameters per example is the vmap method without its
  # micro-batches: then "auto" prefers vmap.
  if method == "auto" and (plan.coverage.error is not None or plan.coverage.ghost_fraction < 0.5):
    return None
  return plan


def clipped_gradient_sum(model: Model, params: Any, x: jax.Array, y: jax.Array,
                         mask: jax.Array, clip_norm: float | jax.Array, method: str = "auto",
                         microbatch_size: int | None = None) -> ClippedSum:
  """sum_i mask_i min(1, C / ||g_i||) g_i, g_i the gradient of example i's loss.

  Neighbouring relation: adding or removing one example (mask 1 -> 0) moves
  `grad_sum` by at most C in L2, whatever the method.

  Args:
    model: the model; its loss is softmax cross-entropy (`example_losses`).
    params: pytree of float32 arrays.
    x: [B, *input_shape]; y: [B] int32; mask: [B] float32 in {0, 1}. Masked
      examples must hold finite inputs (their gradients are computed, then
      weighted by 0).
    clip_norm: C > 0, the L2 bound of each example's contribution.
    method: "ghost", "vmap" or "auto" (ghost when the model supports it).
    microbatch_size: examples per vmap micro-batch ("vmap" only); default:
      as many as fit 2^24 gradient floats.

  Returns:
    ClippedSum(grad_sum, losses [B], norms [B]).

  Raises:
    ValueError: unknown method, or "ghost" for a model it cannot handle
      (raised while tracing, before compilation).
  """
  plan = _resolve(method, model, params, x, y)
  if plan is not None:
    return _ghost(model, params, x, y, mask, clip_norm, plan)
  return _vmap(model, params, x, y, mask, clip_norm, microbatch_size)


def per_example_gradient_norms(model: Model, params: Any, x: jax.Array, y: jax.Array,
                               method: str = "auto") -> jax.Array:
  """||g_i||: [B] float32 L2 norms of the per-example loss gradients (see module doc)."""
  plan = _resolve(method, model, params, x, y)
  if plan is not None:
    return _ghost(model, params, x, y, None, None, plan).norms
  return _vmap(model, params, x, y, jnp.ones(y.shape), None, None).norms
