"""nanoGPT's model and AdamW step in PyTorch (eager, CPU): the bench's external reference.

GPT-2 style, as nanoGPT's `model.py` builds it: learned positions, LayerNorm with bias,
fused qkv with bias, causal `scaled_dot_product_attention`, exact GELU MLP of width 4d,
tied head, no dropout; AdamW with weight decay on the matrices and embeddings only,
gradient clipping. Written here from that description, for timing only.

It runs in a process of its own (`serve`, started by `benchmark.TorchReference`), so it
meets PyTorch's defaults as nanoGPT's `train.py` does: its OpenMP threads wait as they
normally do, nothing of XLA's thread pools or of our allocator settings
(`xla_flags.py`) is in its process. The bench asks it for `n` steps at a time, in the
same rounds as the JAX variants, so both see the same load on a shared machine.

Protocol: the shape and optimizer as one JSON line on stdin, then one line per
request, `{"steps": n}`, each answered (the shape too, once built) by `{"loss", "cpu_s",
"minor_faults"}` (its own process's CPU time and page faults so far). A request
`{"matmul": [batch, m, k, n, dtype], "calls": c}` is answered by `{"seconds"}`: c calls
of `torch.matmul` on random [batch, m, k] and [batch, k, n] tensors (`matmuls.py`).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def build(shape: dict):
  """The step function for `shape` (d_model, n_heads, n_layers, batch, seq_len, vocab,
  lr, b1, b2, weight_decay, grad_clip, seed)."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  d, h, n_layers = shape['d_model'], shape['n_heads'], shape['n_layers']
  b, l, vocab = shape['batch'], shape['seq_len'], shape['vocab']

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
      self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.fc, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
      q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
      heads = lambda t: t.view(b, l, h, d // h).transpose(1, 2)
      a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
      x = x + self.proj(a.transpose(1, 2).reshape(b, l, d))
      return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(l, d)
      self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
      self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
      x = self.wte(idx) + self.wpe(torch.arange(l))
      for block in self.blocks:
        x = block(x)
      return self.ln_f(x) @ self.wte.weight.T

  torch.manual_seed(shape['seed'])
  model = GPT()
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': shape['weight_decay']},
                           {'params': no_decay, 'weight_decay': 0.0}],
                          lr=shape['lr'], betas=(shape['b1'], shape['b2']))
  gen = torch.Generator().manual_seed(shape['seed'])
  batches = [torch.randint(0, vocab, (b, l + 1), generator=gen) for _ in range(8)]
  clip = shape['grad_clip'] or float('inf')

  def steps(n: int) -> float:
    loss = None
    for i in range(n):
      tokens = batches[i % len(batches)]
      loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, vocab),
                             tokens[:, 1:].reshape(-1))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
      opt.step()
    return float(loss.item()) if loss is not None else float('nan')
  return steps


def flops_per_step(shape: dict) -> float:
  """Analytic matmul FLOPs of one step (6 per weight per token, plus attention)."""
  d, n_layers, l = shape['d_model'], shape['n_layers'], shape['seq_len']
  matmul = n_layers * 12 * d * d + shape['vocab'] * d
  return (6 * matmul + 12 * n_layers * d * l) * shape['batch'] * l


def _clocks() -> dict:
  return {'cpu_s': time.process_time(),
          'minor_faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt}


def matmul_timer():
  """A function of ([batch, m, k, n, dtype], calls) that times `calls` calls of
  torch.matmul on that product (its operands made once per product) in seconds."""
  import torch
  operands = {}

  def run(product: list, calls: int) -> float:
    key = tuple(product)
    if key not in operands:
      batch, m, k, n, dtype = key
      dt = {'f32': torch.float32, 'bf16': torch.bfloat16, 'f16': torch.float16}[dtype]
      gen = torch.Generator().manual_seed(0)
      lead = (batch,) if batch > 1 else ()  # as matmuls.xla_timer shapes them
      operands[key] = (torch.randn(*lead, m, k, generator=gen).to(dt),
                       torch.randn(*lead, k, n, generator=gen).to(dt))
      torch.matmul(*operands[key])  # warm: the library's first call sets itself up
    a, b = operands[key]
    t = time.perf_counter()
    for _ in range(calls):
      torch.matmul(a, b)
    return time.perf_counter() - t
  return run


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
  steps = build(json.loads(stdin.readline()))
  matmul = matmul_timer()
  # Ready, with the clocks so far: the first timed steps do not count the start-up.
  print(json.dumps({'loss': float('nan'), **_clocks()}), file=stdout, flush=True)
  for line in stdin:
    request = json.loads(line)
    if 'matmul' in request:
      answer = {'seconds': matmul(request['matmul'], int(request['calls']))}
    else:
      answer = {'loss': steps(int(request['steps'])), **_clocks()}
    print(json.dumps(answer), file=stdout, flush=True)


if __name__ == '__main__':
  serve()
