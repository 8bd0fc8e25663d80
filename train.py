"""Train a scalejax model: `python train.py --config configs/quickstart.py --workdir DIR`.

The command is `scalejax.cli.train` (`--help` lists its flags); this file keeps the
short form working from the repository's top.
"""

from __future__ import annotations

from scalejax.cli import train

if __name__ == '__main__':
  train.run()
