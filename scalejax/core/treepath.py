"""Names of pytree paths, the same for dict keys, attributes and namedtuple fields."""

from __future__ import annotations

import jax


def path_name(path) -> str:
  """keystr-style name with dict keys and attributes alike: "['opt_state'][1]['mu']".

  A namedtuple field and the dict key Orbax saves it under get the same name.
  """
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.SequenceKey):
      parts.append(f'[{k.idx}]')
    else:
      parts.append(f'[{str(getattr(k, "key", getattr(k, "name", k)))!r}]')
  return ''.join(parts)
