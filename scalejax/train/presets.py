"""The paper's model sizes as training configs (read by configs/paper_*.py).

Llama-style: RMSNorm Pre-Norm, RoPE, SwiGLU, full multi-head attention, untied
embedding and LM head, vocabulary 50,304 (GPT-2's BPE padded to a multiple of 64),
context 2048, bfloat16 compute with float32 params. The 1B shape is the one that
reproduces the paper's Llama-1B counts (1,028,065,024 params, 80,640 in scale
vectors); the other shapes, and every optimizer setting here, are ours: the paper's
are not known. Print any config's counts with
`python -m scalejax.cli.param_report --config configs/paper_dense_1b.py`.

Data defaults to the synthetic stream so that every config compiles and runs
anywhere; for a real run point `data.*` at a corpus and a tokenizer of at most 50,304
ids, e.g. `--config.data.source=tfds --config.data.tfds_name=... --config.data.tokenizer=
sentencepiece --config.data.spm_model=...`.

Batch size, remat and mesh defaults were chosen with `python -m scalejax.cli.aot` for
v5p-8 (4 chips): see the README's "Scale out" section for the per-device memory.
"""

from scalejax.train.config import base_config

# name -> model shape, training length and settings (all but the 1B shape: ours)
SIZES = {
    # d_model 640 (head dim 64) is HBM-bound on v5p with float32 RoPE and remat, even
    # with splash attention: RoPE in bfloat16 drops the float32 copies of q and k that
    # XLA writes around the kernel's layout change, and nothing is recomputed (remat
    # 'none', 77 of 95 GiB per chip at batch 256). Compute-bound then (PERFORMANCE.md).
    'dense_120m': dict(model=dict(d_model=640, n_layers=12, n_heads=10, remat='none',
                                  rope_dtype='compute'),
                       lr=1.5e-3, steps=5_000, warmup=1_000),
    'dense_500m': dict(model=dict(d_model=1280, n_layers=20, n_heads=20),
                       lr=8e-4, steps=20_000, warmup=2_000),
    'dense_1b': dict(model=dict(d_model=1792, n_layers=22, n_heads=14),
                     lr=5e-4, steps=40_000, warmup=2_000),
    'dense_2b': dict(model=dict(d_model=2304, n_layers=28, n_heads=18),
                     lr=3e-4, steps=80_000, warmup=2_000),
    'moe_500m': dict(model=dict(d_model=640, n_layers=12, n_heads=10, mlp='moe',
                                moe_experts=16, moe_top_k=2, moe_expert_ff=1024),
                     lr=1e-3, steps=10_000, warmup=1_000),
    'moe_2b': dict(model=dict(d_model=1536, n_layers=18, n_heads=12, mlp='moe',
                              moe_experts=16, moe_top_k=2, moe_expert_ff=1280),
                   lr=6e-4, steps=20_000, warmup=2_000),
}


def paper_config(name: str):
  size = SIZES[name]
  cfg = base_config()
  cfg.model.update(**{'vocab_size': 50_304, 'max_seq_len': 2048, 'tie_embeddings': False,
                      'dtype': 'bfloat16', 'remat': 'full', 'grad_fence': True,
                      **size['model']})
  if cfg.model.mlp == 'moe':
    cfg.model.update(moe_capacity_factor=1.25, moe_group_size=512)
  cfg.data.update(source='synthetic', synthetic_vocab=50_304, eval_batches=4)
  cfg.train.update(steps=size['steps'], batch_size=256, seq_len=2048, eval_every=1000,
                   log_every=50, sample_tokens=0)
  cfg.optimizer.update(name='adamw', lr=size['lr'], schedule='cosine',
                       warmup_steps=size['warmup'], min_lr_ratio=0.1, weight_decay=0.1,
                       b1=0.9, b2=0.95, grad_clip=1.0)
  cfg.checkpoint.update(every=1000, keep=3)
  cfg.mesh.update(data=1, fsdp=-1, tensor=1, expert=1)
  return cfg
