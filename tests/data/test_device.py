"""Tests for fedjax_priv.data.device (cohort gathering and local batch sampling)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv.data.device import gather_cohort, sample_client_batches
from fedjax_priv.data.packing import CohortData

sample = jax.jit(sample_client_batches, static_argnums=(2, 3, 4, 5))


def make_cohort(num_examples, client_mask, max_examples):
  """Example i of slot k has x = (k + 1, i + 1) and label y = i; padding is zero."""
  num_examples = np.asarray(num_examples)
  k, i = np.meshgrid(np.arange(len(num_examples)), np.arange(max_examples), indexing="ij")
  valid = i < num_examples[:, None]
  x = np.stack([k + 1, i + 1], axis=-1) * valid[..., None]
  return CohortData(jnp.asarray(x, jnp.float32), jnp.asarray(i * valid, jnp.int32),
                    jnp.asarray(num_examples, jnp.int32),
                    jnp.asarray(client_mask, jnp.float32))


def slot_keys(seed, num_slots):
  return jax.random.split(jax.random.key(seed), num_slots)


def assert_gathered_rows_match(cohort, batch):
  """Each real batch slot holds an actual example of its own client (x and y agree)."""
  x, y, mask = np.asarray(batch.x), np.asarray(batch.y), np.asarray(batch.example_mask)
  for k in range(x.shape[0]):
    real = mask[k] > 0
    np.testing.assert_array_equal(x[k][real], np.asarray(cohort.x)[k][y[k][real]])


# --- shuffle ----------------------------------------------------------------------


def test_shuffle_covers_every_example():
  """shuffle: with n <= S*B every example appears, evenly (counts differ by <= 1), indices < n;
  an empty client and a padded slot get all-zero masks."""
  S, B, M = 3, 4, 8
  num_examples = [5, 8, 1, 0, 3]
  client_mask = [1, 1, 1, 1, 0]  # Slot 4 is padding (with a non-zero count, on purpose).
  cohort = make_cohort(num_examples, client_mask, M)
  batch, overflow = sample(cohort, slot_keys(0, 5), S, B, "shuffle", None)

  assert batch.x.shape == (5, S, B, 2) and batch.y.shape == batch.example_mask.shape == (5, S, B)
  assert int(overflow) == 0
  assert_gathered_rows_match(cohort, batch)
  for k, n in enumerate(num_examples[:3]):
    ids = np.asarray(batch.y[k]).ravel()
    np.testing.assert_array_equal(batch.example_mask[k], 1.0)
    assert ids.max() < n
    counts = np.bincount(ids, minlength=n)
    assert counts.min() >= 1, f"client {k}: an example was never used"
    assert counts.max() - counts.min() <= 1, f"client {k}: uneven epochs {counts}"
  np.testing.assert_array_equal(batch.example_mask[3], 0.0)
  np.testing.assert_array_equal(batch.example_mask[4], 0.0)
  np.testing.assert_array_equal(batch.num_examples, num_examples)
  np.testing.assert_array_equal(batch.client_mask, client_mask)


def test_shuffle_order_depends_on_key():
  """Different keys give different orders, the same key the same order."""
  cohort = make_cohort([8], [1], 8)
  a, _ = sample(cohort, slot_keys(1, 1), 2, 4, "shuffle", None)
  b, _ = sample(cohort, slot_keys(2, 1), 2, 4, "shuffle", None)
  c, _ = sample(cohort, slot_keys(1, 1), 2, 4, "shuffle", None)
  assert not np.array_equal(a.y, b.y)
  np.testing.assert_array_equal(a.y, c.y)
  np.testing.assert_array_equal(np.sort(np.asarray(a.y).ravel()), np.arange(8))


# --- poisson ----------------------------------------------------------------------


def test_poisson_inclusion_rate_and_masks():
  """poisson: each example is in a step with rate b/n (within 4 sd), masks cover only real
  examples, no example twice in one step, empty and padded slots all-zero."""
  S, B, M, b = 3000, 12, 20, 4.0
  num_examples = [20, 5, 0, 7]
  client_mask = [1, 1, 1, 0]
  cohort = make_cohort(num_examples, client_mask, M)
  batch, overflow = sample(cohort, slot_keys(3, 4), S, B, "poisson", b)
  assert batch.y.shape == (4, S, min(B, M))
  assert_gathered_rows_match(cohort, batch)
  mask, ids = np.asarray(batch.example_mask), np.asarray(batch.y)

  for k, n in enumerate(num_examples[:2]):
    q = min(1.0, b / n)
    real_x = np.asarray(batch.x)[k][mask[k] > 0]
    # Padded examples have x == 0; real ones x == (k + 1, i + 1) with i < n.
    assert np.all(real_x[:, 0] == k + 1) and np.all((real_x[:, 1] >= 1) & (real_x[:, 1] <= n)), \
        "a padded example was selected"
    for step in range(S):
      chosen = ids[k, step][mask[k, step] > 0]
      assert len(set(chosen.tolist())) == len(chosen), f"duplicate in step {step}"
    counts = np.bincount(ids[k][mask[k] > 0], minlength=n)
    rate = counts / S
    sd = np.sqrt(q * (1 - q) / S)
    np.testing.assert_array_less(np.abs(rate - q), 4 * sd)
  np.testing.assert_array_equal(mask[2], 0.0)
  np.testing.assert_array_equal(mask[3], 0.0)
  assert int(overflow) == 0


def test_poisson_overflow_is_counted_when_capacity_is_tiny():
  """With capacity 1 and b=4 most steps select more than 1 example: overflow counts them."""
  S, b = 1000, 4.0
  num_examples = [20, 5]
  cohort = make_cohort(num_examples, [1, 1], 20)
  batch, overflow = sample(cohort, slot_keys(4, 2), S, 1, "poisson", b)
  assert batch.example_mask.shape == (2, S, 1)
  # P(Binomial(n, q) > 1) per (client, step).
  p_over = [1 - (1 - q) ** n - n * q * (1 - q) ** (n - 1)
            for n, q in ((n, b / n) for n in num_examples)]
  expected = S * sum(p_over)
  sd = np.sqrt(S * sum(p * (1 - p) for p in p_over))
  assert 0 < int(overflow) <= 2 * S
  assert abs(int(overflow) - expected) < 4 * sd
  # A truncated step still holds one real example.
  np.testing.assert_array_less(np.asarray(batch.y)[batch.example_mask > 0].max(), 20)


def test_sample_client_batches_rejects_bad_mode():
  cohort = make_cohort([3], [1], 4)
  with pytest.raises(ValueError, match="mode"):
    sample_client_batches(cohort, slot_keys(0, 1), 2, 2, "bogus")
  with pytest.raises(ValueError, match="expected_batch_size"):
    sample_client_batches(cohort, slot_keys(0, 1), 2, 2, "poisson")


# --- gather_cohort -------------------------------------------------------------------


def test_gather_cohort_takes_rows_and_zeroes_masked_slots():
  """gather_cohort picks the population rows by index; masked slots get num_examples 0."""
  population = make_cohort([3, 5, 0, 2, 4], [1] * 5, 6)
  indices = jnp.array([3, 0, -1, 4], jnp.int32)
  mask = jnp.array([1, 1, 0, 1], jnp.float32)
  cohort = jax.jit(gather_cohort)(population, indices, mask)
  for slot, index in enumerate([3, 0, None, 4]):
    if index is None:
      assert int(cohort.num_examples[slot]) == 0
      continue
    np.testing.assert_array_equal(cohort.x[slot], population.x[index])
    np.testing.assert_array_equal(cohort.y[slot], population.y[index])
    assert int(cohort.num_examples[slot]) == int(population.num_examples[index])
  np.testing.assert_array_equal(cohort.num_examples, [2, 3, 0, 4])
  assert cohort.client_mask.dtype == jnp.float32
  np.testing.assert_array_equal(cohort.client_mask, mask)
  # And a gathered cohort samples as the population's clients would.
  batch, _ = sample(cohort, slot_keys(5, 4), 2, 3, "shuffle", None)
  np.testing.assert_array_equal(batch.example_mask[2], 0.0)
  counts = collections.Counter(np.asarray(batch.y[0]).ravel().tolist())
  assert sorted(counts) == [0, 1]
