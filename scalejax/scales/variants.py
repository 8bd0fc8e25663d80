"""Named scale-vector variants: each is a handful of settings over the shared pieces.

A variant fixes the scale form, branch heterogeneity (HG), the dual placement around
linear maps (DP/DNP) and the default weight-decay policy for scale vectors. Block
placement (pre/post/sandwich) is orthogonal and set by `model.placement`, so every
variant has a Post-Norm counterpart where it makes sense. Adding a variant is one
entry in `VARIANTS`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Variant:
  scale: str = 'vector'       # key of norms.SCALE_FORMS
  hg: bool = False            # branch-specific scales over one shared normalization
  dual: str = 'none'          # 'none' | 'dp' | 'dnp' on model.dual_targets
  norm_decay: str = 'none'    # default scale weight-decay policy: 'all' | 'none' | 'iwd'
  # Freeze the magnitude part (magdir's beta) of every scale whose magnitude is
  # function-neutral (model/wiring.py, Scale.neutral): the ablation of a dead parameter.
  freeze_neutral: bool = False
  summary: str = ''


VARIANTS: dict[str, Variant] = {
    'baseline': Variant(summary='one vector gamma per norm (Llama-style)'),
    'no_scale': Variant(scale='none', summary='normalization only, no learnable scale'),
    'hg': Variant(hg=True, summary='separate q/k/v and gate/up scales over one norm'),
    'dp': Variant(dual='dp', summary='scales on both sides of the wrapped linear maps'),
    'dnp': Variant(dual='dnp', summary='DP with a normalization after the linear map'),
    'magdir': Variant(scale='magdir', summary='gamma = beta * alpha'),
    'magdir_unit': Variant(scale='magdir_unit', summary='gamma = beta sqrt(d) alpha/|alpha|'),
    'unified': Variant(scale='magdir', hg=True, dual='dnp', norm_decay='iwd',
                       summary='HG + DNP + magdir (OR) + input-only decay (IWD)'),
    # DNP renormalizes every map a block's input norms feed, so their beta changes
    # nothing but still takes Adam steps on noise: this freezes it at 1.
    'unified_frozen': Variant(scale='magdir', hg=True, dual='dnp', norm_decay='iwd',
                              freeze_neutral=True,
                              summary='unified with beta frozen where its magnitude is '
                                      'function-neutral'),
    # HG splits a norm that feeds several maps; a Post-Norm output also feeds the
    # residual stream, so Post-Norm gets the rest of the recipe.
    'unified_nohg': Variant(scale='magdir', dual='dnp', norm_decay='iwd',
                            summary='unified without HG (its Post-Norm counterpart)'),
}


def get_variant(name: str) -> Variant:
  if name not in VARIANTS:
    raise ValueError(f'unknown model.variant {name!r}; valid: {", ".join(VARIANTS)}')
  return VARIANTS[name]
