"""Zero-shot classification and image-text retrieval evaluation, sharded and padding-safe.

  evaluator.py   the Evaluator interface and `build_evaluators(config.evals, model_config, mesh)`
  zeroshot.py    prompt-ensemble classifiers, top-1 / top-5
  retrieval.py   recall@1/5/10 both ways, several captions per image, mean R@1
  metrics.py     the metric math on host embeddings (numpy), with one documented tie rule
  base.py        padded global batches over the mesh, gathering embeddings to every process
  datasets.py    webdataset (clip_benchmark / DataComp), TFDS ArrayRecord, JSONL, folders, demo
  templates.py   class names and prompt templates (OpenAI ImageNet ones read from open_clip)
  registry.py    standard evaluations by name ('imagenet', 'coco', 'demo', ...)
  runner.py      loading checkpoints and writing results, for launch/evaluate.py

The entry points below are imported lazily, so `templates` or `metrics` load without JAX.
"""
import importlib

_LAZY = {'build_evaluator': 'mobileclip_jax.evaluation.evaluator',
         'build_evaluators': 'mobileclip_jax.evaluation.evaluator',
         'Evaluator': 'mobileclip_jax.evaluation.evaluator'}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
