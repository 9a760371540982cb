"""MobileCLIP's (v1) recipe on DataCompDR-1B (Apple's run_datacompdr1b.sh).

  python launch/train.py --config=configs/mobileclip.py:s2 --workdir=DIR
  python launch/train.py --config=configs/mobileclip.py:b_lt --workdir=DIR

Variants: s0 s1 s2 b, and b_lt (MobileCLIP-B LT: 300k steps at constant lr, then 300k cosine,
36B samples seen). Presets after the variant: runlocal, ablation_12m (see configs/mobileclip2.py).
"""
from mobileclip_jax import config as config_lib

VARIANTS = {'s0': 'MobileCLIP-S0', 's1': 'MobileCLIP-S1', 's2': 'MobileCLIP-S2',
            'b': 'MobileCLIP-B', 'b_lt': 'MobileCLIP-B'}


def get_config(arg=None):
  variant, presets = config_lib.parse_arg(arg, VARIANTS, 'configs/mobileclip.py')
  c = config_lib.base_config()
  c.model.name = VARIANTS[variant]

  # DataCompDR-1B: 10 augmentations and 5 synthetic (CoCa) captions per image, embedded by the
  # OpenAI and DataComp-XL ViT-L/14 teachers.
  c.data.name = 'datacompdr_1b'
  c.data.syn_key_regex = '^syn_text$'

  c.batch_size = 65536
  c.schedule.total = '200000_steps'
  c.schedule.warmup = '1000_steps'
  c.optim.lr = 1e-3
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.2
  c.optim.grad_clip = 1.0
  if variant == 'b_lt':
    c.schedule.total = '600000_steps'
    c.schedule.kind = 'constant_cosine'
    c.schedule.constant = '300000_steps'

  # lambda = 1 for the S variants, 0.75 for B; both teachers at logit scale 100.
  lam = 0.75 if variant.startswith('b') else 1.0
  c.loss.clip_weight, c.loss.distill_weight = 1.0 - lam, lam
  c.loss.teacher_scales = (100.0, 100.0)
  c.loss.average = 'probs'
  return config_lib.apply_presets(c, presets)
