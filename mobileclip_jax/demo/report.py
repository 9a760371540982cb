"""The demo's results: per model the headline metrics over seeds, a text table and loss curves.

results.json (outside checks read these names):
  {"models": {ROLE: {METRIC: {"mean", "std", "values"}, "zeroshot": {TASK: {...}},
                     "train": {"wall_s", "cpu_s"}}},
   "seconds": wall seconds of the whole demo, "stages": {STAGE: {"wall_s", "cpu_s"}}, ...}
with ROLE in teacher_a, teacher_b, student_clip, student_dr and METRIC in zero_shot_mean,
heldout, i2t_r1, t2i_r1 (fractions in 0..1; "values" per seed). The students' synthetic captions:
  "reinforcement": {"captioner", "dataset", "samples",
                    "caption_quality": {SYN_KEY: caption_quality.CaptionQuality.rates()},
                    "captions": {SYN_KEY: duplicate measures before/after regeneration}},
  "captioner": the CoCa's training {"steps", "caption_loss", "train": {"wall_s", "cpu_s"}} (with a
  CoCa), "captioner_ablation": {CAPTIONER: like "reinforcement"} (--captioner_ablation).
"""
import os
from typing import Any, Dict, Mapping, Sequence

from mobileclip_jax import experiment
from mobileclip_jax.demo import caption_quality
from mobileclip_jax.demo import hparams as settings_lib

# The headline metrics: name -> the evaluator metric of `settings.eval_entries`.
METRICS = {'zero_shot_mean': 'zeroshot/demo/mean_top1',
           'heldout': 'zeroshot/demo_heldout_object/top1',
           'i2t_r1': 'retrieval/demo_retrieval/i2t_R@1',
           't2i_r1': 'retrieval/demo_retrieval/t2i_R@1'}
_TASK_PREFIX, _TASK_SUFFIX = 'zeroshot/demo_', '/top1'


def model_entry(variant: Mapping[str, Any], runs: Mapping[str, Any]) -> Dict[str, Any]:
  """One model's results.json entry from the runner's stats of its variant and its runs."""
  entry = {name: variant[key] for name, key in METRICS.items()}
  entry['zeroshot'] = {
      key[len(_TASK_PREFIX):-len(_TASK_SUFFIX)]: value for key, value in variant.items()
      if key.startswith(_TASK_PREFIX) and key.endswith(_TASK_SUFFIX)
      and not key.startswith(_TASK_PREFIX + 'heldout')}
  entry['train'] = {k: round(sum(r['train'][k] for r in runs.values()), 2)
                    for k in ('wall_s', 'cpu_s')}
  entry['seeds'] = len(runs)
  return entry


def _pm(s: Mapping[str, Any]) -> str:
  text = f"{100 * s['mean']:5.1f}"
  return text + (f" ± {100 * s['std']:4.1f}" if len(s['values']) > 1 else '       ')


def format_tables(models: Mapping[str, Mapping[str, Any]]) -> str:
  """Two text tables: headline metrics (mean ± std over seeds, %), and zero-shot per task."""
  width = max(len(settings_lib.LABELS[r]) for r in models)
  lines = [f'{"":<{width}}  seeds  {"ZS mean":>12}  {"held-out obj":>12}  {"i2t R@1":>12}  '
           f'{"t2i R@1":>12}  train wall (CPU)']
  for role, m in models.items():
    lines.append(f'{settings_lib.LABELS[role]:<{width}}  {m["seeds"]:>5}  ' + '  '.join(
        f'{_pm(m[k]):>12}' for k in METRICS) +
        f'  {m["train"]["wall_s"]:>6.0f}s ({m["train"]["cpu_s"]:.0f}s)')
  tasks = list(next(iter(models.values()))['zeroshot'])
  lines += ['', 'Zero-shot top-1 (%, mean over seeds) per task, val split:',
            f'{"":<{width}}  ' + '  '.join(f'{t[:8]:>8}' for t in tasks)]
  for role, m in models.items():
    lines.append(f'{settings_lib.LABELS[role]:<{width}}  ' + '  '.join(
        f'{100 * m["zeroshot"][t]["mean"]:8.1f}' for t in tasks))
  return '\n'.join(lines)


def plot_losses(teacher_dirs: Mapping[str, Sequence[str]],
                student_dirs: Mapping[str, Sequence[str]], path: str) -> None:
  """Training losses: teachers (CLIP), and students (CLIP-only vs DR), mean over seeds."""
  plt = experiment.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for role, dirs in teacher_dirs.items():
    experiment.plot_mean_curve(left, dirs, 'loss', settings_lib.LABELS[role])
  left.set(title='Teachers: CLIP loss (teacher set)', xlabel='step', ylabel='loss')
  clip_dirs, dr_dirs = student_dirs['student_clip'], student_dirs['student_dr']
  experiment.plot_mean_curve(right, clip_dirs, 'loss', 'CLIP only: CLIP loss (= its objective)')
  experiment.plot_mean_curve(right, dr_dirs, 'gt/clip', 'DR: CLIP loss on ground-truth captions')
  experiment.plot_mean_curve(right, dr_dirs, 'loss', 'DR: its objective (CLIP + KD, gt + syn)',
                             linestyle='--')
  right.set(title='Students (same model, steps, batch, schedule; mean over seeds)', xlabel='step')
  for axes in (left, right):
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
  experiment.save_figure(fig, path)


def print_summary(results: Mapping[str, Any], workdir: str, print_fn) -> None:
  print_fn(format_tables(results['models']))
  exported = results['export']
  check = exported['check']
  print_fn('\nExport: ' + exported['weights'] + (
      f"\n  {check['library']}: embeddings rel. L2 image {check['image_rel_l2']:.2e}, text "
      f"{check['text_rel_l2']:.2e} (tokens equal: {check['tokens_equal']})"
      if 'library' in check else f"\n  not checked: {check['skipped']}"))
  quality = {f'{entry["captioner"]}: {key}': rates
             for entry in (results['reinforcement'], *results.get('captioner_ablation',
                                                                   {}).values())
             for key, rates in (entry.get('caption_quality') or {}).items()}
  if quality:
    print_fn('\nSynthetic captions vs the scene labels (main object named; invented shape or '
             'colour):\n' + caption_quality.format_table(quality))
  if 'captioner' in results:
    c = results['captioner']
    print_fn(f"CoCa captioner: {c['steps']} steps, caption loss {c['caption_loss']:.2f}, "
             f"{c['train']['wall_s']:.0f} s wall ({c['train']['cpu_s']:.0f} s CPU)")
  this_run = results['this_run']
  print_fn(f'\nThis run: {this_run["wall_s"]:.0f} s wall, {this_run["cpu_s"]:.0f} s CPU '
           f'(user + system). Results: {os.path.join(workdir, "results.json")}, plot: '
           f'{os.path.join(workdir, "loss_curves.png")}')
