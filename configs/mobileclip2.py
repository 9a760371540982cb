"""MobileCLIP2's released recipe on DFNDR-2B (Apple's run_dfndr2b.sh and its model configs).

  python launch/train.py --config=configs/mobileclip2.py:s4 --workdir=DIR
  python launch/train.py --config=configs/mobileclip2.py:s0,ablation_12m --workdir=DIR
  python launch/train.py --config=configs/mobileclip2.py:s4,runlocal --workdir=/tmp/s4  # CPU smoke run

Variants: s0 s2 s3 s4 b l14. Presets after the variant: runlocal (the demo world, a few steps,
the full architecture), ablation_12m (DataCompDR-12M, batch 8,192, 30k steps).
"""
from mobileclip_jax import config as config_lib

VARIANTS = {'s0': 'MobileCLIP2-S0', 's2': 'MobileCLIP2-S2', 's3': 'MobileCLIP2-S3',
            's4': 'MobileCLIP2-S4', 'b': 'MobileCLIP2-B', 'l14': 'MobileCLIP2-L-14'}


def get_config(arg=None):
  variant, presets = config_lib.parse_arg(arg, VARIANTS, 'configs/mobileclip2.py')
  c = config_lib.base_config()
  c.model.name = VARIANTS[variant]

  # DFNDR-2B: DFN-2B images, each with 30 stored augmentations embedded by two DFN2B-CLIP
  # ViT-L/14 teachers, and synthetic captions of the CoCa captioner fine-tuned on MSCOCO-38k.
  c.data.name = 'dfndr_2b'
  c.data.syn_key_regex = '^syn_text_dfn_mscoco38k$'

  # 16 nodes x 8 GPUs x 512 = 65,536 per step, 200k steps: 13.1B samples seen.
  c.batch_size = 65536
  c.schedule.total = '200000_steps'
  c.schedule.warmup = '1000_steps'
  c.schedule.kind = 'cosine'
  c.optim.lr = 1e-3
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.2
  c.optim.grad_clip = 1.0

  # Pure distillation (lambda = 1) from both teachers at logit scales 70 and 60, their
  # distributions averaged after the softmax; ground-truth and synthetic captions weigh the same.
  c.loss.clip_weight, c.loss.distill_weight = 0.0, 1.0
  c.loss.teacher_scales = (70.0, 60.0)
  c.loss.average = 'probs'
  c.loss.gt_weight, c.loss.syn_weight = 1.0, 1.0
  return config_lib.apply_presets(c, presets)
