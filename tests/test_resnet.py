"""ResNet backbone: torchvision-compatible structure and sizes, BatchNorm behaviour, logical axis names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrs.models import resnet


def _abstract_variables(size, channels=3, image=64):
  model = resnet.ResNet(size)
  return model, jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image, image, channels)),
                                                  train=False))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size,expected", [("resnet18", 11_176_512), ("resnet50", 23_508_032)])
def test_param_count_matches_torchvision_without_fc(size, expected):
  # torchvision: 11,689,512 / 25,557,032 params with the 1000-class fc (512*1000+1000 / 2048*1000+1000).
  _, variables = _abstract_variables(size)
  assert _count(nn.meta.unbox(variables["params"])) == expected


def test_input_channels_only_change_the_stem():
  _, three = _abstract_variables("resnet18", channels=3)
  _, one = _abstract_variables("resnet18", channels=1)
  diff = _count(nn.meta.unbox(three["params"])) - _count(nn.meta.unbox(one["params"]))
  assert diff == 7 * 7 * 2 * 64


def test_module_names_map_to_torchvision():
  _, variables = _abstract_variables("resnet50")
  params = nn.meta.unbox(variables["params"])
  blocks = sorted(k for k in params if k.startswith("layer"))
  assert blocks == sorted(f"layer{i + 1}_{j}" for i, n in enumerate((3, 4, 6, 3)) for j in range(n))
  assert {"conv1", "bn1"} <= set(params)
  # torchvision has a downsample (1x1 conv + BN) in the first block of every stage of a bottleneck ResNet.
  with_downsample = sorted(k for k in blocks if "downsample_0" in params[k])
  assert with_downsample == ["layer1_0", "layer2_0", "layer3_0", "layer4_0"]
  assert set(params["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_0", "downsample_1"}
  assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert "bias" not in params["conv1"]


def test_logical_axis_names():
  _, variables = _abstract_variables("resnet18")
  specs = nn.get_partition_spec(variables)["params"]
  assert tuple(specs["layer1_0"]["conv1"]["kernel"]) == (None, None, "conv_in", "conv_out")
  assert tuple(specs["bn1"]["scale"]) == ("norm",)


def test_pooled_features_for_any_input_channels():
  # Shapes only (the forward pass itself is exercised by the RS-BYOL tests).
  for size, channels, features in (("resnet18", 1, 512), ("resnet50", 3, 2048)):
    model = resnet.ResNet(size)
    x = jnp.zeros((2, 48, 48, channels))
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (2, features) and out.dtype == jnp.float32
    _, updates = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_forward_flops_match_torchvision_macs():
  # torchvision's published 4.09 / 1.81 GMACs at 224 px (conv FLOPs = 2 per MAC; the fc adds ~0.002).
  assert resnet.forward_flops("resnet50", 224) / 2e9 == pytest.approx(4.09, abs=0.01)
  assert resnet.forward_flops("resnet18", 224) / 2e9 == pytest.approx(1.81, abs=0.01)
  assert resnet.ResNet("resnet50").num_features == 2048
  with pytest.raises(ValueError, match="resnet50"):
    resnet.forward_flops("resnet49", 224)
