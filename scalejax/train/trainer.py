"""The training loop: build everything from a config, resume, train, eval, save."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict
import optax
from flax import nnx
from tqdm import tqdm

from scalejax.train import checkpoint as ckpt
from scalejax.train import config as config_lib
from scalejax.train import distributed
from scalejax import data as data_lib
from scalejax.train import nonfinite, preemption, records, xla_flags
from scalejax.train import metrics as metrics_lib
from scalejax.core import reductions, roles, sharding
from scalejax.model import attention, wiring
from scalejax.model.counting import flops_per_token, param_counts
from scalejax.model.decoder import build_model, cross_entropy
from scalejax.train.optim import build_optimizer, make_schedule
from scalejax.analysis.scale_stats import (precond_means, preconditioner_statistics, role_means,
                                           scale_statistics)
from scalejax.eval import runner as lm_eval_runner
from scalejax.scales.weight_decay import decay_table

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


def build_run(cfg: ConfigDict, workdir: str | None, devices=None, abstract: bool = False
              ) -> tuple[Run, dict]:
  """Returns the run and a freshly initialised (sharded) train state.

  `devices` (default: all) may be compile-only devices of a TPU topology (aot.py); with
  `abstract` the state is ShapeDtypeStructs carrying their shardings, nothing allocated.
  """
  devices = jax.devices() if devices is None else devices
  config_lib.validate(cfg, len(devices))
  mesh = sharding.make_mesh(cfg.mesh, devices)
  data = data_lib.build_data(
      cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), workdir=workdir)
  model_cfg = config_lib.model_config(cfg, data.tokenizer.vocab_size)
  abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, cfg.seed))
  graphdef, abstract_params = nnx.split(abstract_model)
  abstract_params = nnx.to_pure_dict(abstract_params)
  role_tree, axes_tree = roles.role_tree(abstract_model), roles.axes_tree(abstract_model)
  tx, schedule, rates = build_optimizer(
      cfg.optimizer, role_tree, axes_tree, cfg.train.steps, model_cfg.variant_spec.norm_decay,
      parts=roles.part_tree(abstract_model), frozen=roles.frozen_tree(abstract_model))

  param_sh = sharding.tree_shardings(axes_tree, abstract_params, mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # A param-shaped state leaf (Adam's moments) is sharded as its param. Params that a
  # masked branch does not own (optax.multi_transform, e.g. Muon's) are MaskedNodes in
  # that branch's state and stay so; factored statistics (Adafactor's row/column
  # vectors) are small and replicated.
  masked = lambda x: isinstance(x, optax.MaskedNode)

  def state_sharding(leaf, param_sharding, param):
    if masked(leaf):
      return leaf
    return param_sharding if leaf.shape == param.shape else replicated
  opt_sh = optax.tree_map_params(tx, state_sharding, abstract_opt, param_sh, abstract_params,
                                 transform_non_params=lambda _: replicated, is_leaf=masked)
  state_sh = {'params': param_sh, 'opt_state': opt_sh, 'step': replicated,
              **{k: replicated for k in nonfinite.counters()}}

  def init():
    params = roles.params_of(build_model(model_cfg, cfg.seed))
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32),
            **nonfinite.counters()}

  with jax.set_mesh(mesh):
    state = (_abstract(jax.eval_shape(init), state_sh) if abstract
             else jax.jit(init, out_shardings=state_sh)())
  run = Run(cfg, model_cfg, mesh, graphdef, role_tree, axes_tree, tx, schedule, rates,
            state_sh, data)
  return run, state


def loss_fn(graphdef, params, batch):
  """Returns (training loss, metrics): cross-entropy plus the weighted MoE aux losses.

  The metrics hold the cross-entropy as `loss` (comparable between dense and MoE
  models) and the MoE router statistics (moe_lb_loss, moe_z_loss, moe_drop_frac).
  """
  model = nnx.merge(graphdef, params)
  logits, aux = model.forward(batch['inputs'])
  ce = cross_entropy(logits, batch['targets'])
  return ce + model.aux_loss(aux), {'loss': ce, **aux}


def compiler_options(run: Run, tuned: bool = True) -> dict | None:
  """XLA options for the run's steps (xla_flags.py); `tuned` False: XLA's defaults."""
  return xla_flags.compiler_options(run.mesh.devices.flat[0].platform) if tuned else None


def make_train_step(run: Run, tuned: bool = True):
  """The jitted train step; `tuned` False compiles it with XLA's default options (the
  bench's `untuned` call, which measures what the project's options change)."""
  bad_limit = nonfinite.bad_step_limit(run.cfg.train)

  def step(state, batch):
    (total, metrics), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        run.graphdef, state['params'], batch)
    updates, opt_state = run.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    # A step with a non-finite loss, gradient or update keeps the old params and
    # optimizer state and is counted (nonfinite.py).
    kept, fault_metrics = nonfinite.guard_step(
        state, {'params': params, 'opt_state': opt_state}, total, grads, updates, bad_limit)
    metrics = {**metrics, 'grad_norm': reductions.global_norm(grads),
               'lr': run.schedule(state['step']), **fault_metrics}
    if run.cfg.optimizer.scale_lr_mult != 1.0:  # the study knob: scale vectors' own LR
      metrics['scale_lr'] = metrics['lr'] * run.cfg.optimizer.scale_lr_mult
    return {**kept, 'step': state['step'] + 1}, metrics
  return jax.jit(step, donate_argnums=0, out_shardings=(run.state_shardings, None),
                 compiler_options=compiler_options(run, tuned))


def make_eval_step(run: Run):
  return jax.jit(lambda params, batch: loss_fn(run.graphdef, params, batch)[1]['loss'],
                 compiler_options=compiler_options(run))


def evaluate(run: Run, eval_step, params) -> float | None:
  if not run.data.eval_batches:
    return None
  losses = [eval_step(params, sharding.global_batch(b, run.mesh)) for b in run.data.eval_batches]
  return float(jnp.mean(jnp.stack(losses)))


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def train(cfg: ConfigDict, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final metrics.

  SIGTERM/SIGINT end the run after the current step with a checkpoint saved; the
  result's 'stopped' names the signal (None when the run finished). Too many
  non-finite steps in a row raise nonfinite.NonFiniteError, with the last good state
  saved. `stop_at` ends the process early after saving that step, as an interruption
  would (used by tests; the run resumes from there when called again).
  """
  distributed.maybe_initialize()  # before anything touches a JAX backend
  config_lib.validate(cfg)  # bad input fails here: nothing is written or compiled yet
  tasks = lm_eval_tasks(cfg)  # and an unknown lm-eval task name here
  is_main = jax.process_index() == 0
  make_workdir(workdir)
  mngr = ckpt.manager(workdir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
  try:
    check_workdir_config(cfg, workdir, mngr.latest_step())
    if is_main:
      records.atomic_write(os.path.join(workdir, 'config.json'), config_lib.to_json(cfg))
    with preemption.StopRequest() as stop_request:
      final = _train(cfg, workdir, stop_at, mngr, stop_request, is_main, tasks)
  except KeyboardInterrupt:
    raise  # asked to stop at once: a save in flight is not waited for
  except BaseException:
    mngr.close()  # commits a save in flight (the last good state of a NonFiniteError)
    raise
  mngr.close()  # an async save commits before train() returns
  if final['stopped']:
    log.warning('stopped by %s after step %d; checkpoint saved in %s', final['stopped'],
                final['step'], os.path.join(os.path.abspath(workdir), 'checkpoints',
                                            str(final['step'])))
  return final


def make_workdir(workdir: str) -> None:
  """Creates `workdir` (and its parents); a path that cannot be a directory is a
  ValueError naming it and the fix, before anything is written."""
  if not workdir:
    raise ValueError('--workdir is empty; name a directory for the run')
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'--workdir {workdir} is an existing file, not a directory; '
                     'pick another --workdir (or move the file away)')
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f'--workdir {workdir} lies under {parent}, which is a file; '
                     'pick a --workdir whose parents are directories')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--workdir {workdir} cannot be created ({e.strerror}); '
                     'pick a writable location') from None


def lm_eval_tasks(cfg: ConfigDict) -> lm_eval_runner.TaskRun | None:
  """The run's lm-eval tasks (cfg.lm_eval), resolved once; None when it names none."""
  e = cfg.lm_eval
  names = lm_eval_runner.parse_tasks(e.tasks)
  if not names:
    return None
  return lm_eval_runner.TaskRun(names, e.include_path, e.limit, e.batch_size,
                                include_flag='lm_eval.include_path')


def _train(cfg: ConfigDict, workdir, stop_at, mngr, stop_request, is_main, tasks) -> dict:
  run, state = build_run(cfg, workdir)
  found = ckpt.restore_latest(mngr, _abstract(state, run.state_shardings), workdir,
                             cfg.optimizer.name,
                             defaults={k: state[k] for k in nonfinite.counters()})
  if found is not None:
    step, state, data_state = found
    run.data.train_iter.set_state(data_state)
    log.info('resumed from step %d in %s', step, workdir)
  elif cfg.init_from:
    params, src_step = ckpt.restore_params(cfg.init_from, _abstract(
        state['params'], run.state_shardings['params']))
    state = dict(state, params=params)
    log.info('params initialised from %s (step %d); fresh optimizer', cfg.init_from, src_step)
  start = int(state['step'])
  if int(state['bad_streak']) >= nonfinite.bad_step_limit(cfg.train):
    # The run stopped on non-finite steps and is rerun: give it a fresh chance.
    state = dict(state, bad_streak=jax.device_put(jnp.zeros((), jnp.int32),
                                                  run.state_shardings['bad_streak']))
  steps = cfg.train.steps
  if start > steps:
    log.warning('the checkpoint is at step %d, past train.steps=%d: nothing to train',
                start, steps)
  if is_main:  # records of steps after the checkpoint are redone below
    records.truncate_records(workdir, start)
  writer = metrics_lib.Writer(workdir, enabled=is_main, purge_step=start + 1)

  counts = param_counts(run.model_cfg)
  flops_tok = flops_per_token(run.model_cfg, cfg.train.seq_len)
  # On CPU the peak is the median of matmul probes, one more at every eval (the bench's
  # measure), so the logged MFU does not move with the load of one second.
  peak = metrics_lib.Peak()
  if is_main and start == 0:
    log.info('model %s: %s params (%s in norms)\n%s\n%s\nMFU peak: %.3g FLOP/s per device (%s)',
             run.model_cfg.variant, f'{counts["total"]:,}', f'{counts["norm"]:,}',
             decay_table(state['params'], run.roles, run.rates),
             wiring.scale_report(run.model_cfg), peak.flops, peak.source)
    if cfg.optimizer.magdir_decay != 'both':
      log.info('magdir scales: only the %s part decays (optimizer.magdir_decay)',
               cfg.optimizer.magdir_decay)
    log.info('optimizer %s, schedule %s, lr %g, scale-vector lr multiplier %g',
             cfg.optimizer.name, cfg.optimizer.schedule, cfg.optimizer.lr,
             cfg.optimizer.scale_lr_mult)
    on = run.mesh.devices.flat[0].platform
    log.info('attention: %s (model.attention_impl=%s on %s)',
             attention.for_model(run.model_cfg, cfg.train.seq_len, on),
             run.model_cfg.attention_impl, on)

  train_step, eval_step = make_train_step(run), make_eval_step(run)
  watch = nonfinite.NonFiniteWatch(cfg.train)
  tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
  bar = tqdm(total=steps, initial=min(start, steps), disable=not is_main, desc='train',
             dynamic_ncols=True)
  last = {'time': time.perf_counter(), 'step': start}
  final = {'step': start}
  diverged = None

  def log_eval(step):
    eval_loss = evaluate(run, eval_step, state['params'])
    if eval_loss is not None:
      writer.write({'step': step, 'eval_loss': eval_loss})
      final['eval_loss'] = eval_loss
    # Every process computes (the kernels may be sharded across hosts); only the
    # summary scalars come to the host, and only process 0's writer writes.
    stats = scale_statistics(state['params'], run.roles, run.axes)
    if stats:
      # Bounds for the scales that fold (model/wiring.py); Post-Norm's norms also feed
      # the residual stream, so the preconditioner formula does not apply to them.
      precond = preconditioner_statistics(nnx.merge(run.graphdef, state['params']))
      writer.write({'step': step, 'scales': stats, 'precond': precond}, name='scale_stats')
      writer.write({'step': step, **role_means(stats), **precond_means(precond)},
                   name='scales')
    return eval_loss

  # A signal during setup stops the run before its first step (nothing new to save).
  stopped = stop_request.signal_name if stop_request.should_stop(0) else None
  todo = range(start + 1, steps + 1) if not stopped else range(0)
  with jax.set_mesh(run.mesh):
    for step in todo:
      state, m, diverged = advance(run, train_step, state, watch, step, steps)
      if step % cfg.train.log_every == 0 or step == steps:
        m = jax.device_get(m)
        now = time.perf_counter()
        # The first interval of a process includes compilation; its speed is not logged.
        tps = (tokens_per_step * (step - last['step']) / (now - last['time'])
               if last['step'] != start or step == steps else float('nan'))
        last.update(time=now, step=step)
        rec = {'step': step, 'loss': float(m['loss']), 'lr': float(m['lr']),
               **({'scale_lr': float(m['scale_lr'])} if 'scale_lr' in m else {}),
               'grad_norm': float(m['grad_norm']), 'bad_steps': int(m['bad_steps']),
               'tokens_per_sec': tps,
               'mfu': tps * flops_tok / peak.total(jax.device_count()),
               **{k: float(v) for k, v in m.items() if k.startswith('moe_')}}
        writer.write(rec)
        final.update(rec)
        bar.set_postfix(loss=f'{rec["loss"]:.3f}', tok_s=f'{tps:,.0f}')
      bar.update(1)
      final['step'] = step
      paused = time.perf_counter()
      # Every record of a step is written before its checkpoint: a run resumed from
      # that checkpoint finds them all (and truncate_records drops any later ones).
      if not diverged and ((cfg.train.eval_every and step % cfg.train.eval_every == 0)
                           or step == steps):
        eval_loss = log_eval(step)
        peak.sample()
        if step == steps and is_main and eval_loss is not None:
          log.info('step %d: eval_loss %.4f', steps, eval_loss)
      if tasks is not None and not diverged and (
          step == steps or (cfg.lm_eval.every and step % cfg.lm_eval.every == 0)):
        # Every process runs the tasks (the params may be sharded over hosts).
        scores = tasks(run.graphdef, state['params'], run.data.tokenizer, cfg.train.seq_len)
        writer.write({'step': step, **scores})
        final.update(scores)
        if is_main:
          log.info('step %d: %s', step, ', '.join(f'{k} {v:.4g}' for k, v in scores.items()))
      if stop_request.should_stop(step - start):  # every step: a sync point across hosts
        stopped = stop_request.signal_name
      done = (step == steps or stopped or diverged
              or (stop_at is not None and step >= stop_at))
      if step % cfg.checkpoint.every == 0 or done:
        ckpt.save(mngr, step, state, run.data.train_iter.get_state())
      last['time'] += time.perf_counter() - paused  # eval and saves are not step time
      if done:
        break
    bar.close()
  writer.close()
  if diverged:
    where = os.path.join(os.path.abspath(workdir), 'checkpoints', str(final['step']))
    raise nonfinite.NonFiniteError(f'{diverged}; checkpoint: {where}')
  final['stopped'] = stopped
  final['state'] = state
  final['run'] = run
  return final


def advance(run: Run, train_step, state, watch, step: int, last_step: int):
  """One step of the train loop: the next batch onto the mesh, the step dispatched, and
  the verdicts of earlier steps read when their turn comes (`nonfinite.NonFiniteWatch`;
  the last steps' at once).
  Returns (state, metrics, a stop message or None). The bench's `--call=loop` times
  exactly this, so the loop's overhead over the step is measured in one process."""
  batch = sharding.global_batch(next(run.data.train_iter), run.mesh)
  state, m = train_step(state, batch)
  diverged = watch.push(step, m) or (watch.flush() if step == last_step else None)
  return state, m, diverged


def check_workdir_config(cfg: ConfigDict, workdir: str, checkpoint_step: int | None) -> None:
  """Refuses to resume a workdir whose config.json differs in what is trained.

  Differences in RESUMABLE_CHANGES (train.steps, logging, checkpointing, mesh ...) are
  logged; any other difference is a ValueError listing them all, unless
  train.allow_config_change is set. Runs only when there is a checkpoint to resume.
  """
  path = os.path.join(workdir, 'config.json')
  if checkpoint_step is None or not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  refused, allowed = config_lib.resume_changes(saved, cfg)
  if refused and not cfg.train.allow_config_change:
    raise ValueError(
        f'{workdir} holds a run with a different config ({"; ".join(refused)}); use a new '
        '--workdir, or pass --config.train.allow_config_change=True to resume it anyway')
  if refused or allowed:
    log.warning('resuming %s with config changes: %s', workdir, '; '.join(refused + allowed))
    if jax.process_index() == 0:
      records.atomic_write(os.path.join(workdir, f'config.before_step{checkpoint_step}.json'),
                          json.dumps(saved, indent=2, sort_keys=True))
  old_steps = saved.get('train', {}).get('steps', cfg.train.steps)
  if old_steps != cfg.train.steps:
    old = float(make_schedule(cfg.optimizer, old_steps)(checkpoint_step))
    new = float(make_schedule(cfg.optimizer, cfg.train.steps)(checkpoint_step))
    if old != new:
      log.warning('train.steps %d -> %d recomputes the %s lr schedule: the lr at step %d '
                  'goes from %.3g to %.3g', old_steps, cfg.train.steps,
                  cfg.optimizer.schedule, checkpoint_step, old, new)
