"""Names of what travels from the input pipeline through the train step into the losses.

A training batch (data/loader.py -> train/step.py), per example:
  IMAGE             uint8 [H, W, 3]  the replayed augmentation (normalized on device)
  TEXT              int32 [L]        a ground-truth caption's tokens
  SYN_TEXT          int32 [L]        a synthetic caption's tokens            (reinforced data)
  TEACHER_IMAGE     float32 [D_T]    the teacher ensemble's embedding of that augmentation
  TEACHER_TEXT      float32 [D_T]    ... of the ground-truth caption
  TEACHER_SYN_TEXT  float32 [D_T]    ... of the synthetic caption
D_T is the sum of the teachers' widths (their unit vectors side by side).

The losses' `embeddings` mapping (train/step.py -> losses.py) holds the student's IMAGE_EMB,
TEXT_EMB, SYN_TEXT_EMB [B, E], the scalar parameters LOGIT_SCALE (log) and LOGIT_BIAS, and the
teacher entries under their batch names.
"""
IMAGE = 'image'
TEXT = 'text'
SYN_TEXT = 'syn_text'
TEACHER_IMAGE = 'teacher_image_emb'
TEACHER_TEXT = 'teacher_text_emb'
TEACHER_SYN_TEXT = 'teacher_syn_text_emb'
TEACHERS = (TEACHER_IMAGE, TEACHER_TEXT, TEACHER_SYN_TEXT)
PLAIN_BATCH = (IMAGE, TEXT)
REINFORCED_BATCH = PLAIN_BATCH + (SYN_TEXT,) + TEACHERS

IMAGE_EMB = 'image_emb'
TEXT_EMB = 'text_emb'
SYN_TEXT_EMB = 'syn_text_emb'
LOGIT_SCALE = 'logit_scale'
LOGIT_BIAS = 'logit_bias'
MASKS = 'masks'  # Learned inheritance's gates in a masked model's params (inheritance/masks.py).
