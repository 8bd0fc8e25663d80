"""The training loop: build everything from a config, resume, train, eval, save."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

from scalejax import checkpoint as ckpt
from scalejax import config as config_lib
from scalejax import data as data_lib
from scalejax import metrics as metrics_lib
from scalejax import roles, sharding
from scalejax.counting import flops_per_token, param_counts
from scalejax.model import build_model, cross_entropy
from scalejax.optim import build_optimizer, resolve_norm_decay
from scalejax.scale_stats import role_means, scale_statistics
from scalejax.weight_decay import decay_table

log = logging.getLogger('scalejax')


@dataclasses.dataclass
class Run:
  """Everything a step needs, built once from the config."""
  cfg: object
  model_cfg: object
  mesh: object
  graphdef: object
  roles: dict
  axes: dict
  tx: optax.GradientTransformation
  schedule: object
  rates: dict
  state_shardings: dict
  data: data_lib.Data


def build_run(cfg, workdir: str | None) -> tuple[Run, dict]:
  """Returns the run and a freshly initialised (sharded) train state."""
  config_lib.validate(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  data = data_lib.build_data(
      cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), workdir=workdir)
  model_cfg = config_lib.model_config(cfg, data.tokenizer.vocab_size)
  abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, cfg.seed))
  graphdef, abstract_params = nnx.split(abstract_model)
  abstract_params = nnx.to_pure_dict(abstract_params)
  role_tree, axes_tree = roles.role_tree(abstract_model), roles.axes_tree(abstract_model)
  tx, schedule, rates = build_optimizer(cfg.optimizer, role_tree, axes_tree, cfg.train.steps,
                                        model_cfg.variant_.norm_decay)

  param_sh = sharding.tree_shardings(axes_tree, abstract_params, mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  state_sh = {'params': param_sh, 'opt_state': opt_sh, 'step': replicated}

  def init():
    params = roles.params_of(build_model(model_cfg, cfg.seed))
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=state_sh)()
  run = Run(cfg, model_cfg, mesh, graphdef, role_tree, axes_tree, tx, schedule, rates,
            state_sh, data)
  return run, state


def loss_fn(graphdef, params, batch):
  logits = nnx.merge(graphdef, params)(batch['inputs'])
  return cross_entropy(logits, batch['targets'])


def make_train_step(run: Run):
  def step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn, argnums=1)(run.graphdef, state['params'], batch)
    updates, opt_state = run.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
               'lr': run.schedule(state['step'])}
    if run.cfg.optimizer.scale_lr_mult != 1.0:  # the study knob: scale vectors' own LR
      metrics['scale_lr'] = metrics['lr'] * run.cfg.optimizer.scale_lr_mult
    return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, metrics
  return jax.jit(step, donate_argnums=0, out_shardings=(run.state_shardings, None))


def make_eval_step(run: Run):
  return jax.jit(lambda params, batch: loss_fn(run.graphdef, params, batch))


def evaluate(run: Run, eval_step, params) -> float | None:
  if not run.data.eval_batches:
    return None
  losses = [eval_step(params, sharding.global_batch(b, run.mesh)) for b in run.data.eval_batches]
  return float(jnp.mean(jnp.stack(losses)))


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def train(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final metrics.

  `stop_at` ends the process early after saving that step, as an interruption
  would (used by tests; the run resumes from there when called again).
  """
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  run, state = build_run(cfg, workdir)
  mngr = ckpt.manager(workdir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
  writer = metrics_lib.Writer(workdir, enabled=is_main)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_lib.to_json(cfg))

  start = mngr.latest_step()
  if start is not None:
    ckpt.check_opt_state(mngr, start, state['opt_state'], cfg.optimizer.name)
    state, data_state = ckpt.restore(mngr, start, _abstract(state, run.state_shardings))
    run.data.train_iter.set_state(data_state)
    log.info('resumed from step %d in %s', start, workdir)
  elif cfg.init_from:
    params, src_step = ckpt.restore_params(cfg.init_from, _abstract(
        state['params'], run.state_shardings['params']))
    state = dict(state, params=params)
    log.info('params initialised from %s (step %d); fresh optimizer', cfg.init_from, src_step)
  start = int(state['step'])

  counts = param_counts(run.model_cfg)
  flops_tok = flops_per_token(run.model_cfg, cfg.train.seq_len)
  peak, peak_src = metrics_lib.device_peak_flops()
  peak_total = peak * jax.device_count()
  if is_main and start == 0:
    log.info('model %s: %s params (%s in norms)\n%s\nMFU peak: %.3g FLOP/s per device (%s)',
             run.model_cfg.variant, f'{counts["total"]:,}', f'{counts["norm"]:,}',
             decay_table(state['params'], run.roles, run.rates), peak, peak_src)
    log.info('optimizer %s, schedule %s, lr %g, scale-vector lr multiplier %g',
             cfg.optimizer.name, cfg.optimizer.schedule, cfg.optimizer.lr,
             cfg.optimizer.scale_lr_mult)

  train_step, eval_step = make_train_step(run), make_eval_step(run)
  tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
  steps = cfg.train.steps
  bar = tqdm(total=steps, initial=start, disable=not is_main, desc='train', dynamic_ncols=True)
  last = {'time': time.perf_counter(), 'step': start}
  final = {}

  def log_eval(step):
    eval_loss = evaluate(run, eval_step, state['params'])
    if eval_loss is not None:
      writer.write({'step': step, 'eval_loss': eval_loss})
      final['eval_loss'] = eval_loss
    if is_main:
      stats = scale_statistics(jax.device_get(state['params']), run.roles, run.axes)
      if stats:
        writer.write({'step': step, 'scales': stats}, name='scale_stats')
        writer.write({'step': step, **role_means(stats)}, name='scales')
    return eval_loss

  with jax.set_mesh(run.mesh):
    for step in range(start + 1, steps + 1):
      batch = sharding.global_batch(next(run.data.train_iter), run.mesh)
      state, m = train_step(state, batch)
      if step % cfg.train.log_every == 0 or step == steps:
        m = jax.device_get(m)
        now = time.perf_counter()
        # The first interval of a process includes compilation; its speed is not logged.
        tps = (tokens_per_step * (step - last['step']) / (now - last['time'])
               if last['step'] != start or step == steps else float('nan'))
        last.update(time=now, step=step)
        rec = {'step': step, 'loss': float(m['loss']), 'lr': float(m['lr']),
               **({'scale_lr': float(m['scale_lr'])} if 'scale_lr' in m else {}),
               'grad_norm': float(m['grad_norm']), 'tokens_per_sec': tps,
               'mfu': tps * flops_tok / peak_total}
        writer.write(rec)
        final.update(rec)
        bar.set_postfix(loss=f'{rec["loss"]:.3f}', tok_s=f'{tps:,.0f}')
      bar.update(1)
      paused = time.perf_counter()
      if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != steps:
        log_eval(step)
      if step % cfg.checkpoint.every == 0 or step == steps:
        ckpt.save(mngr, step, state, run.data.train_iter.get_state())
      last['time'] += time.perf_counter() - paused  # eval and saves are not step time
      if stop_at is not None and step >= stop_at:
        ckpt.save(mngr, step, state, run.data.train_iter.get_state())
        break
    bar.close()
    if start < steps and int(state['step']) == steps:
      eval_loss = log_eval(steps)
      if is_main and eval_loss is not None:
        log.info('step %d: eval_loss %.4f', steps, eval_loss)
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  final['state'] = state
  final['run'] = run
  return final
