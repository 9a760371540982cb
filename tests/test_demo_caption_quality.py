"""Synthetic captions scored against the demo world's scene labels (demo/caption_quality.py): each
rate equals a hand count; the oracle captioner is always right; the world's noisy ground truth
invents values at the rate it was made with."""
import math

import numpy as np
import pytest

from mobileclip_jax.demo import caption_quality
from mobileclip_jax.demo import captions as captions_lib
from mobileclip_jax.demo import world as world_lib
from mobileclip_jax.reinforce import captioners

# A red star (main) and a blue circle on a navy background.
LABELS = {'shape': 'star', 'color': 'red', 'count': 2, 'texture': 'stripes',
          'background_color': 'navy',
          'objects': [{'shape': 'star', 'color': 'red', 'size': 'large', 'position': 'left',
                       'style': 'filled'},
                      {'shape': 'circle', 'color': 'blue', 'size': 'small', 'position': 'top',
                       'style': 'outline'}]}
# caption -> (shape, colour, object correct, invented shape, invented colour), by hand.
CASES = {
    'a large red star on a striped navy background and a blue circle':
        (True, True, True, False, False),
    'a green star': (True, False, False, False, True),
    'two hearts: a red star': (True, True, True, True, False),
    'IMG_1234.jpg': (False, False, False, False, False),
    'a blue star, medium-sized': (True, False, False, False, False),
    'red circles on a light gray background': (False, True, False, False, False),
    'star red': (True, True, False, False, False),
    'Red Stars!': (True, True, True, False, False),
    'a white cross and a starry sky': (False, False, False, True, True),
}


@pytest.mark.parametrize('text', list(CASES))
def test_each_caption_is_flagged_as_counted_by_hand(text):
  shape, color, obj, shape_invented, color_invented = CASES[text]
  assert caption_quality.caption_flags(text, LABELS) == {
      'shape_correct': shape, 'color_correct': color, 'object_correct': obj,
      'hallucinated': shape_invented or color_invented, 'shape_hallucinated': shape_invented,
      'color_hallucinated': color_invented}


def test_rates_equal_hand_counts():
  texts = list(CASES)
  # Three images of three captions; unit embeddings (one teacher): captions 0 and 2 of image 1
  # are near duplicates (cosine 0.99), the others orthogonal.
  captions = [texts[0:3], texts[3:6], texts[6:9]]
  emb = [np.eye(3, 8, dtype=np.float32) for _ in captions]
  emb[1][2] = 0.99 * emb[1][0] + math.sqrt(1 - 0.99 ** 2) * np.eye(8)[7]
  # Image 2 repeats its first caption (another case and punctuation): an exact duplicate.
  captions[2] = [texts[6], 'Star, red.', texts[8]]
  rates = caption_quality.measure(captions, [LABELS] * 3, emb, num_teachers=1, threshold=0.95)
  n = 9
  assert rates['captions'] == n
  # Hand counts over the nine captions (the repeat has the flags of 'star red').
  assert rates['shape_correct'] == pytest.approx(6 / n)
  assert rates['color_correct'] == pytest.approx(5 / n)
  assert rates['object_correct'] == pytest.approx(2 / n)
  assert rates['hallucinated_rate'] == pytest.approx(3 / n)
  assert rates['shape_hallucinated_rate'] == pytest.approx(2 / n)
  assert rates['color_hallucinated_rate'] == pytest.approx(2 / n)
  assert rates['exact_duplicate_rate'] == pytest.approx(1 / n)
  assert rates['near_duplicate_rate'] == pytest.approx(2 / n)
  assert rates['empty_rate'] == 0.0
  # distinct-1 of image 2: 'star red' 'star red' 'a white cross and a starry sky' -> 8 distinct
  # of 11 words; images 0 and 1 by their own counts.
  words = [[captioners.normalize_caption(c).split() for c in image] for image in captions]
  expected = np.mean([len({w for c in image for w in c}) / sum(map(len, image))
                      for image in words])
  assert rates['distinct_1'] == pytest.approx(expected)
  assert len({w for c in words[2] for w in c}) == 8 and sum(map(len, words[2])) == 11


def _scenes(n, split='train', seed=0):
  config = world_lib.DemoWorldConfig()
  return config, [world_lib.sample_scene(config, split, i, seed).labels() for i in range(n)]


@pytest.mark.parametrize('temperature', [0.0, 0.7, float('inf')])
def test_the_oracle_names_the_main_object_and_invents_nothing(temperature):
  _, labels = _scenes(300)
  rng = np.random.default_rng(0)
  made = captions_lib.DemoCaptioner(temperature)(labels, 2, rng)
  emb = [np.eye(2, 4, dtype=np.float32)] * len(labels)
  rates = caption_quality.measure(made, labels, emb, num_teachers=1, threshold=0.95)
  for key in ('shape_correct', 'color_correct', 'object_correct'):
    assert rates[key] == 1.0, key
  for key in ('hallucinated_rate', 'shape_hallucinated_rate', 'color_hallucinated_rate'):
    assert rates[key] == 0.0, key
  # Scenes with a second object of another shape: naming the main one is not a given.
  assert any(len({o['shape'] for o in l['objects']}) > 1 for l in labels)


def _close(seen, p, n):
  return abs(seen - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_ground_truth_invents_values_at_the_world_s_wrong_rate():
  """A noisy caption replaces the main shape or (if mentioned) colour by a value no object has
  with probability `wrong`, unless it is junk; nothing else in it names a shape or colour that
  is not there. So the detector's rates follow from the world's: hallucinated (1 - u) * w, shape
  named (1 - u) * (1 - w * P(the shape is the replaced field))."""
  _, labels = _scenes(3000)
  config = world_lib.DemoWorldConfig(caption_noise=1.0)
  r = config.caption_rates()
  rng = np.random.default_rng(1)
  flags = [caption_quality.caption_flags(captions_lib.gt_caption(l, config, rng), l)
           for l in labels]
  shape_replaced = 1 - (1 - r['omit']) * 0.5  # The colour is replaced only when mentioned, 1/2.
  for flag, p in (('hallucinated', (1 - r['uninformative']) * r['wrong']),
                  ('shape_hallucinated', (1 - r['uninformative']) * r['wrong'] * shape_replaced),
                  ('shape_correct', (1 - r['uninformative']) * (1 - r['wrong'] * shape_replaced))):
    seen = np.mean([f[flag] for f in flags])
    assert _close(seen, p, len(flags)), (flag, seen, p)


def test_format_table_lists_each_key():
  _, labels = _scenes(10)
  made = captions_lib.DemoCaptioner()(labels, 2, np.random.default_rng(0))
  rates = caption_quality.measure(made, labels, [np.eye(2, 4, dtype=np.float32)] * 10, 1, 0.95)
  table = caption_quality.format_table({'demo: syn_text': rates, 'coca: syn_text_coca': rates})
  assert table.splitlines()[1].startswith('demo: syn_text ') and '100.0' in table
  assert len(table.splitlines()) == 3
