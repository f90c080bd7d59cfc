"""Analytic FLOP counts of the MAE family agree with XLA's count of the compiled train step (value_and_grad)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import auxmae, common, jointmae, mae_s2, mixmae, rsbyol
from mmrs import methods
from mmrs.methods import flops

B, SIZE = 2, 32


@pytest.fixture(scope="module", autouse=True)
def small_size():
  # A small but not microscopic ViT: matmuls dominate as they do at real sizes (norms/softmax are not counted).
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(common.VIT_SIZES, "test128", (128, 1, 512, 4))
    yield


@pytest.mark.parametrize("config_module,arg,task_name", [
    (mae_s2, "tiny", "s2_mae"), (auxmae, "tiny", "s2_mae"), (auxmae, "tiny", "s2_to_s1"), (mixmae, "tiny", "mixmae"),
    (jointmae, "tiny", "jointmae"), (jointmae, "tiny,plain=True", "jointmae_plain")])
def test_flops_analytic_within_10_percent_of_xla(config_module, arg, task_name):
  config = config_module.get_config(arg)
  config.model.update(encoder="test128", decoder="test128", decoder_depth=1, patch_size=8)
  config.batch_size = B  # JointMAE's complementary row group is sized from it
  for name in config.data:
    config.data[name].image_size = SIZE
  method = methods.build(config)
  batch = {"s2": jnp.ones((B, SIZE, SIZE, 12)), "s1": jnp.ones((B, SIZE, SIZE, 2))}
  _check(method, task_name, batch)


def _check(method, task_name, batch):
  # Shapes are all XLA's count needs: abstract params, no initialization.
  params, state = nn.meta.unbox(jax.eval_shape(method.init, jax.random.key(0), batch))
  task = {t.name: t for t in method.tasks}[task_name]
  step = lambda p, s, b, rng: jax.value_and_grad(task.loss_fn, has_aux=True)(p, s, b, rng, True)
  # -O0 code generation: the same count (it is taken from the optimized HLO), half the CPU compile time.
  measured = flops.xla_flops(step, params, state, batch, jax.random.key(1),
                             compiler_options={"xla_backend_optimization_level": 0})
  analytic = B * method.flops_per_sample(task_name)
  assert analytic == pytest.approx(measured, rel=0.10)


# The ViT backbone only: the analytic ResNet count (torchvision-style, every 3x3 tap) is 14% above XLA's train-step
# count at 128 px and 1.7x at 32 px, where the last stages' 3x3 convs mostly read padding that XLA does not count.
def test_flops_rsbyol_within_10_percent_of_xla():
  config = rsbyol.get_config("tiny")
  config.model.backbone = "vit"
  config.model.vit.update(size="test128", patch_size=8)
  config.views.image_size = size = SIZE
  method = methods.build(config)
  views = {"view1": jnp.ones((B, size, size, 1)), "view2": jnp.ones((B, size, size, 1))}
  _check(method, "byol", views)


def test_flops_blocks_count_matches_hand_count():
  # One block, 10 tokens, width 8, mlp 16: QKV 2*10*8*24 + scores/AV 2*2*10*10*8 + out 2*10*8*8 + MLP 2*2*10*8*16.
  assert flops.blocks_flops(10, 8, 1, 16) == 3840 + 3200 + 1280 + 5120
  assert flops.train_flops(100.0, entry=10.0) == 320.0
