r"""Trains a SentencePiece BPE tokenizer on a dataset's captions.

  python launch/train_tokenizer.py --captions='tars:shards/{00000000..00000063}.tar' \
      --vocab_size=32000 --out=/path/to/tokenizer.model
  python launch/train_tokenizer.py --captions=tfds:datacompdr_12m@/data/tfds,extra.jsonl ...

Sources (see mobileclip_jax.data.caption_corpus): plain-text files (one caption per line), .jsonl files
(their --field), webdataset shards ('tars:PATTERN': txt and syn.json captions) and built datasets
('tfds:NAME[@DATA_DIR]'). Use the result in a config as the tokenizer spec
'sentencepiece:/path/to/tokenizer.model'.
"""
import itertools

from absl import flags

from mobileclip_jax import cli
from mobileclip_jax.data import caption_corpus
from mobileclip_jax.data import tokenizer as tokenizer_lib

_CAPTIONS = flags.DEFINE_list(
    'captions', None, "Caption sources: text/.jsonl files, 'tars:PATTERN', 'tfds:NAME[@DATA_DIR]'.",
    required=True)
_FIELD = flags.DEFINE_string('field', 'caption', 'Caption field of each object in .jsonl files.')
_VOCAB_SIZE = flags.DEFINE_integer(
    'vocab_size', 32000,
    'Vocabulary size, SOT and EOT included (an upper bound: small corpora give fewer).')
_OUT = flags.DEFINE_string('out', None, 'Where the SentencePiece .model file is written.',
                           required=True)
_NUM_EXAMPLES = flags.DEFINE_integer('num_examples', 3, 'Example captions to print tokenized.')


def main(argv):
  del argv
  tokenizer = tokenizer_lib.train_sentencepiece(
      caption_corpus.iter_captions(_CAPTIONS.value, _FIELD.value), _VOCAB_SIZE.value, _OUT.value)
  print(f'Wrote {_OUT.value}: vocab_size {tokenizer.vocab_size} (asked {_VOCAB_SIZE.value}), '
        f'SOT {tokenizer.sot_token_id}, EOT {tokenizer.eot_token_id}, '
        f'pad {tokenizer.pad_token_id}.')
  print(f"Tokenizer spec for configs: 'sentencepiece:{_OUT.value}'")
  examples = itertools.islice(caption_corpus.iter_captions(_CAPTIONS.value, _FIELD.value),
                              _NUM_EXAMPLES.value)
  for caption in examples:
    ids = tokenizer.encode(caption)
    print(f'{caption!r}\n  ids    {ids}\n  pieces {tokenizer.pieces(ids)}')


if __name__ == '__main__':
  cli.run(main)
