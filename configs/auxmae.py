"""AuxMAE: `--config=configs/auxmae.py:VARIANT[,key=value...]` (variants and keys as configs/mae_s2.py).

Two tasks sharing the encoder, alternated one per step (AGD): `s2_mae` reads config.data.s2_only (S2 chips; a
paired shard directory works too, its S1 is ignored), `s2_to_s1` reads config.data.paired. `vit_b`: the paper's
ViT-B/16 encoder, two ViT-Lite decoders, Adafactor, batch 4096, 1M steps (500K per task).
Arguments: `shards=PATH` (all datasets), `s2_only_shards=PATH` (the s2_mae task's only).
"""
from configs import mae_s2


def get_config(arg=None):
  c, arg = mae_s2.mae_family_config(arg, "auxmae", ("s2_only", "paired"), vit_b_steps=1_000_000,
                                    s2_only_shards="")
  if arg.s2_only_shards:
    c.data.s2_only.shards = arg.s2_only_shards
  c.task_schedule = "alternate"
  return c
