r"""Print a config's parameter counts.

    python -m scalejax.cli.param_report --config configs/paper_dense_1b.py \
        [--config.model.variant=unified ...]

Total, embedding table, LM head, non-embedding, scale-vector params and their share,
active params per token (MoE: the top-k routed experts) and training FLOPs per token,
then every scale with its role, what it feeds, whether it folds and whether its
magnitude is function-neutral (model/wiring.py).
The analytic counts (counting.py) are checked against the model itself, built
abstractly (`nnx.eval_shape`: no memory), so the two can never silently disagree.
"""

from __future__ import annotations

import jax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from scalejax.cli import common
from scalejax.train import config as config_lib
from scalejax.core import roles
from scalejax.model import wiring
from scalejax.model.counting import flops_per_token, param_counts
from scalejax.model.decoder import build_model


def built_counts(model_cfg) -> dict[str, int]:
  """total and scale-vector params of the model as built (abstractly)."""
  model = nnx.eval_shape(lambda: build_model(model_cfg))
  sizes = [p.size for p in jax.tree.leaves(roles.params_of(model))]
  role_list = jax.tree.leaves(roles.role_tree(model))
  return dict(total=sum(sizes),
              scale=sum(s for s, r in zip(sizes, role_list) if r in roles.SCALE_ROLES))


def report(cfg) -> tuple[str, dict[str, int]]:
  """(text, counts) for a training config; the vocabulary must be fixed in the config."""
  if cfg.model.vocab_size == 0:
    raise ValueError('model.vocab_size=0 takes the tokenizer\'s size; set '
                     '--config.model.vocab_size to count params without building the data')
  model_cfg = config_lib.model_config(cfg, cfg.model.vocab_size)
  counts = param_counts(model_cfg)
  built = built_counts(model_cfg)
  if built != {k: counts[k] for k in built}:
    raise AssertionError(f'counting.py disagrees with the built model: {counts} vs {built}')
  share = lambda n: f'{100 * n / counts["total"]:.4f}%'
  kind = (f'MoE, {model_cfg.moe_experts} experts, top-{model_cfg.moe_top_k}'
          if model_cfg.mlp == 'moe' else 'dense')
  rows = [
      ('model', f'{kind}, variant {model_cfg.variant}, d_model {model_cfg.d_model}, '
                f'{model_cfg.n_layers} layers, vocab {model_cfg.vocab_size}'),
      ('total params', f'{counts["total"]:,}'),
      ('embedding table', f'{counts["embedding"]:,}'),
      ('LM head', f'{counts["head"]:,}' + (' (tied)' if model_cfg.tie_embeddings else '')),
      ('non-embedding', f'{counts["non_embedding"]:,}  (total - embedding table)'),
      ('scale vectors', f'{counts["scale"]:,}  ({share(counts["scale"])} of total)'),
      ('norm biases', f'{counts["norm"] - counts["scale"]:,}'),
      ('active / token', f'{counts["active"]:,}  ({share(counts["active"])} of total)'),
      ('train FLOPs/token', f'{flops_per_token(model_cfg, cfg.train.seq_len):.4g}  '
                            f'(seq_len {cfg.train.seq_len}; 6N + attention)'),
  ]
  text = '\n'.join(f'{k:<18} {v}' for k, v in rows)
  return text + '\n\n' + wiring.scale_report(model_cfg), counts


def define_flags(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file('config', None, 'config file (configs/*.py)', flag_values=fv,
                                  lock_config=True)
  flags.mark_flag_as_required('config', flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> None:
  common.no_arguments(argv)
  print(report(common.loaded_config(fv))[0])


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()
