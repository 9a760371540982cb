"""Caption sources for tokenizer training: text/JSONL files, webdataset tars, built datasets."""
import json

import pytest

from mobileclip_jax.data import caption_corpus
from mobileclip_jax.demo import training_sets as demo_datasets
from mobileclip_jax.demo import world as demo_world
from mobileclip_jax.data import wds


def test_text_and_jsonl_files(tmp_path):
  text_file = tmp_path / 'caption_corpus.txt'
  text_file.write_text('a dog\n\n  \na cat\r\n')
  jsonl_file = tmp_path / 'caption_corpus.jsonl'
  jsonl_file.write_text('{"caption": "a bird", "uid": 1}\n\n{"caption": "a fish"}\n')
  assert list(caption_corpus.iter_captions([str(text_file), str(jsonl_file)])) == [
      'a dog', 'a cat', 'a bird', 'a fish']
  with pytest.raises(ValueError, match=r"caption_corpus.jsonl:1: .* field 'text'"):
    list(caption_corpus.iter_captions([str(jsonl_file)], field='text'))
  jsonl_file.write_text(json.dumps({'caption': 3}) + '\n')
  with pytest.raises(ValueError, match="caption_corpus.jsonl:1: field 'caption' is a int"):
    list(caption_corpus.iter_captions([str(jsonl_file)]))


def test_webdataset_tars_give_gt_and_synthetic_captions(tmp_path):
  with wds.ShardWriter(str(tmp_path / '{:08d}.tar'), max_samples=2) as writer:
    for i in range(3):
      writer.write(f'k{i}', {'txt': f'caption {i}'.encode(),
                             'syn.json': json.dumps({'syn_text': [f'syn {i}a', f'syn {i}b']}).encode()})
  got = list(caption_corpus.iter_captions([f'tars:{tmp_path}/{{00000000..00000001}}.tar']))
  assert got == ['caption 0', 'syn 0a', 'syn 0b', 'caption 1', 'syn 1a', 'syn 1b',
                 'caption 2', 'syn 2a', 'syn 2b']


def test_built_dataset(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  demo_datasets.build_plain('demo_world', data_dir, 12, 16, 0, 6,
                            demo_world.DemoWorldConfig())
  got = list(caption_corpus.iter_captions([f'tfds:demo_world@{data_dir}']))
  assert len(got) == 12 and all(isinstance(c, str) and c for c in got)
