"""CoCa captioners (open_clip's coca_ViT-B-32 / coca_ViT-L-14) trained with the one trainer.

  python launch/train.py --config=configs/coca.py:l14 --workdir=DIR        # from scratch
  python launch/train.py --config=configs/coca.py:l14,finetune --workdir=DIR \
      --config.model.init_from=ckpt/coca_l14 --config.data.name=my_captions  # fine-tune
  python launch/train.py --config=configs/coca.py:b32,runlocal --workdir=/tmp/coca  # CPU smoke run

Variants: b32 l14. Presets after the variant: runlocal (the demo world's plain data, a few steps,
the full architecture at 64 / 56 px), finetune (open_clip's CoCa fine-tuning recipe: caption loss
only, lr 1e-5; start it from a converted open_clip checkpoint, `launch/convert.py
--torch_checkpoint=... --model=coca_ViT-L-14 --out=ckpt/coca_l14`, through model.init_from).
Freeze towers with optim.freeze, e.g. `--config.optim.freeze="('^visual/',)"`.

The objective is open_clip's CoCaLoss: caption cross-entropy (padding ignored) x caption_weight
+ CLIP x clip_weight, on plain image-caption data (one ground-truth caption per image, tokenized
at the CoCa context of 76). A trained run writes captions with `launch/reinforce.py
--captioners=coca:TAG=WORKDIR` and converts to open_clip with `launch/convert.py
--checkpoint=WORKDIR`.
"""
from mobileclip_jax import config as config_lib
from mobileclip_jax import rules

VARIANTS = {'b32': 'coca_ViT-B-32', 'l14': 'coca_ViT-L-14'}
PRESETS = ('runlocal', 'finetune')
# open_clip decays no 1-D parameter: beside the default rules, the ViT's class embedding, the
# text tower's CLS token and the pooler's packed q/k/v bias.
WD_RULES = ((r'(^|/)(cls_emb|in_proj_bias)$', 0.0), rules.OPEN_CLIP_VIT_WD_RULE
            ) + tuple(rules.DEFAULT_WD_RULES)


def get_config(arg=None):
  variant, presets = config_lib.parse_arg(arg, VARIANTS, 'configs/coca.py')
  c = config_lib.base_config()
  c.model.name = VARIANTS[variant]
  c.loss.objective = 'coca'
  c.loss.caption_weight, c.loss.clip_weight = 2.0, 1.0  # open_clip's CoCaLoss defaults.

  # The released laion2B-s13B-b90k run's scale (13B samples at a ~90k batch) with open_clip's
  # ViT defaults (AdamW beta2 0.98, eps 1e-6, its decay set).
  c.data.name = 'laion2b'
  c.batch_size = 90112
  c.schedule.total = '13e9_examples'
  c.schedule.warmup = '2000_steps'
  c.optim.lr = 1e-3
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
  c.optim.weight_decay = 0.2
  c.optim.wd_rules = WD_RULES

  for preset in presets:
    if preset == 'finetune':
      _finetune(c)
    elif preset in config_lib.PRESETS:
      c = config_lib.apply_presets(c, preset)
    else:
      raise ValueError(f'Unknown preset {preset!r} for configs/coca.py; presets: '
                       f'{", ".join(PRESETS)}.')
  if 'runlocal' in presets:
    c.data.name = 'demo_world'  # Plain image-caption data: the demo's reinforced set is not needed.
    c.model.image_size = {'b32': 64, 'l14': 56}[variant]  # 2x2 / 4x4 patches.
  return c


def _finetune(c):
  """open_clip's README recipe for fine-tuning CoCa on MSCOCO: the generative side only."""
  c.data.name = 'mscoco_captions'
  c.loss.caption_weight, c.loss.clip_weight = 1.0, 0.0
  c.batch_size = 128
  c.schedule.total = '1_epochs'
  c.schedule.warmup = '1000_steps'
  c.optim.lr = 1e-5
  c.optim.weight_decay = 0.1
