"""The PyTorch peer's optimizer (benchmarks/torch_adafactor.py) is mmrs's Adafactor: the same updates over several
steps (factored and not), and one full peer step on copied weights gives mmrs's gradients AND parameters.

Skipped only where torch (an optional benchmark dependency, requirements-bench.txt) is not installed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")

from benchmarks import torch_adafactor  # pylint: disable=wrong-import-position
from benchmarks import torch_vit  # pylint: disable=wrong-import-position
from configs import mae_s2 as mae_config  # pylint: disable=wrong-import-position
from mmrs.methods import mae as mae_lib  # pylint: disable=wrong-import-position
from mmrs.methods import masking  # pylint: disable=wrong-import-position
from mmrs.train import optimizers  # pylint: disable=wrong-import-position
from test_peer import dims, nchw  # pylint: disable=wrong-import-position,g-bad-import-order

ADAFACTOR = dict(name="adafactor", adafactor_decay_rate=0.8, adafactor_clipping=1.0, weight_decay=0.0)


def _mmrs_steps(params, grads_per_step, lr, min_dim):
  tx = optimizers.direction(dict(ADAFACTOR, adafactor_min_dim_to_factor=min_dim), "g")
  state = tx.init(params)
  for grads in grads_per_step:
    u, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, d: p - lr * d, params, u)
  return params


@pytest.mark.parametrize("min_dim", [128, 16])
def test_updates_match_mmrs_over_steps(min_dim):
  """Shapes that are factored (both dims >= min_dim, either order, square), not (small or 1-D), and gradients of
  every scale (the block-RMS clip acts on some)."""
  rng = np.random.default_rng(0)
  shapes = {"a": (256, 128), "b": (128, 300), "c": (160, 160), "d": (64, 20), "e": (300,)}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  steps = [{k: (rng.normal(size=s) * 10.0 ** rng.integers(-3, 2)).astype(np.float32) for k, s in shapes.items()}
           for _ in range(3)]
  want = _mmrs_steps(jax.tree.map(jnp.asarray, params), steps, 0.01, min_dim)
  tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
  opt = torch_adafactor.MmrsAdafactor(list(tensors.values()), lr=0.01, min_dim_size_to_factor=min_dim)
  for grads in steps:
    for k, t in tensors.items():
      t.grad = torch.from_numpy(grads[k].copy())
    opt.step()
  for k, t in tensors.items():
    np.testing.assert_allclose(t.detach().numpy(), np.asarray(want[k]), rtol=2e-5, atol=1e-6, err_msg=k)
  # torch.optim.Adafactor (parameter-scaled, every 2-D tensor factored) is not this update.
  plain = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
  ref = torch.optim.Adafactor(list(plain.values()), lr=0.01)
  for k, t in plain.items():
    t.grad = torch.from_numpy(steps[0][k].copy())
  ref.step()
  one = _mmrs_steps(jax.tree.map(jnp.asarray, params), steps[:1], 0.01, min_dim)
  assert not np.allclose(plain["a"].detach().numpy(), np.asarray(one["a"]), rtol=1e-4)


def test_one_full_peer_step_matches_mmrs_on_copied_weights():
  """Tiny MAE: the same loss, gradients (torch .grad vs jax.grad, through the weight mapping) and, after global-norm
  clipping and one Adafactor step, the same parameters. Factoring at 16 so the tiny model's matrices are factored
  in both layouts (torch Linear (out, in) vs flax (in, out))."""
  config = mae_config.get_config("tiny")
  config.optimizer.update(ADAFACTOR, adafactor_min_dim_to_factor=16, schedule="constant", warmup_steps=0,
                          learning_rate=0.01, clip_norm=1.0)
  method = mae_lib.build(config)
  x = jax.random.normal(jax.random.key(3), (3, 32, 32, 12))
  params, _ = method.init(jax.random.key(0), {"s2": x})
  params = nn.meta.unbox(params)
  rng = jax.random.key(7)
  _, mask = method.mae.forward(params["encoder"], params["decoder"], x, rng, False)
  keep_ids = masking.mask_to_ids(~mask, int((~mask[0]).sum()))
  loss_fn = lambda p: method.mae.loss(p["encoder"], p["decoder"], x, rng, False)  # noqa: E731
  loss, grads = jax.value_and_grad(loss_fn)(params)
  opt = optimizers.make_optimizer(config.optimizer, ("all",), 10)
  new_params, _, _, _ = opt.update({"all": grads}, opt.init({"all": params}), {"all": params}, jnp.asarray(0))

  enc, dec = dims(config)
  build = lambda: torch_vit.build("mae_s2", enc=enc, dec=dec, patch_size=config.model.patch_size,  # noqa: E731
                                  s2_channels=12)
  model, want_grads, want_params = build(), build(), build()
  for m, tree in ((model, params), (want_grads, grads), (want_params, new_params["all"])):
    torch_vit.load_mmrs_params(m, jax.device_get(tree))
  step = torch_vit.make_step(model, torch_adafactor.make_optimizer(model, lr=0.01, min_dim_size_to_factor=16),
                             torch.float32, clip_norm=1.0)
  # make_step zeroes the gradients before its backward: record them from a hook on the optimizer's step
  seen = {}
  original = torch_adafactor.MmrsAdafactor.step

  def recording_step(self, closure=None):
    seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
    return original(self, closure)

  torch_adafactor.MmrsAdafactor.step = recording_step
  try:
    t_loss = step((nchw(x), torch.from_numpy(np.array(keep_ids)).long()))
  finally:
    torch_adafactor.MmrsAdafactor.step = original
  np.testing.assert_allclose(float(t_loss), float(loss), rtol=1e-4)
  scale = min(1.0, 1.0 / float(optimizers.optax.global_norm(grads)))  # the clip both sides applied
  for (name, want), got in zip(want_grads.named_parameters(), (seen[n] for n, _ in model.named_parameters())):
    np.testing.assert_allclose(got.numpy(), scale * want.detach().numpy(), rtol=2e-3, atol=2e-6, err_msg=name)
  for (name, want), got, (_, g) in zip(want_params.named_parameters(), model.parameters(), want_grads.named_parameters()):
    # Adafactor's first step is ~lr * sign(g): where the gradient is rounding noise around an exact 0 (the key
    # bias: softmax ignores a constant added to every key) the sign is arbitrary on either side.
    real = np.abs(g.detach().numpy()) > 1e-7
    np.testing.assert_allclose(got.detach().numpy()[real], want.detach().numpy()[real], rtol=1e-4, atol=2e-5,
                               err_msg=name)
  assert real.mean() > 0.5
