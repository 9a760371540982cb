"""Corrupt-sample errors, their reasons, the skip/fail policy, and the records of every skip.

Used wherever samples are read: building a TFDS dataset from tar shards and loading it for
training. The rule is that no sample disappears without being counted and named: a reader that
finds a bad sample (or an unreadable stretch of a shard) raises `CorruptSampleError`; the caller
hands it to `ErrorPolicy.handle`, which either re-raises it (mode 'fail') or records it in a
`SkipCounter` and a `SkipLog` (mode 'skip') and raises `BudgetExceededError` once more samples
were skipped than the budget allows. Counters are plain picklable objects that merge across
worker processes and serialize to JSON, so per-shard counts survive a crash and a resumed run
still reports the total; the log is the full list, one JSON line per skip.
"""
import collections
import dataclasses
import json
import os
from typing import Any, Iterable, Iterator

# First examples kept per reason for the summary; the full list is the SkipLog file.
_EXAMPLES_PER_REASON = 5

# Reasons (CorruptSampleError.reason) raised by the data layer, with what each means.
MISSING_MEMBER = 'missing_member'
BAD_UTF8 = 'bad_utf8'
BAD_JSON = 'bad_json'
BAD_EMBEDDINGS = 'bad_embeddings'
EMB_ROWS = 'emb_rows'
BAD_IMAGE = 'bad_image'
DUPLICATE = 'duplicate'
TAR_DAMAGED = 'tar_damaged'
TAR_TRUNCATED = 'tar_truncated'
MISSING_SAMPLES = 'missing_samples'
NO_IMAGE_FOR_UID = 'no_image_for_uid'
IMAGE_WITHOUT_SAMPLE = 'image_without_sample'
SHA256_MISMATCH = 'sha256_mismatch'
EMPTY_CAPTION = 'empty_caption'
EMB_WIDTH = 'emb_width'
EMB_NONFINITE = 'emb_nonfinite'
EMB_NORM = 'emb_norm'
TOO_FEW_AUGMENTATIONS = 'too_few_augmentations'
SYN_MISMATCH = 'syn_mismatch'
BAD_PAUG = 'bad_paug'
REASONS = {
    MISSING_MEMBER: 'a member the sample needs (image, txt, syn.json, paug.json, npz/pth.gz) '
                    'is absent',
    BAD_UTF8: 'a text member is not valid UTF-8',
    BAD_JSON: 'a JSON member does not parse or lacks its fields',
    BAD_EMBEDDINGS: 'the npz/pth.gz member does not load or lacks image_emb/text_emb',
    EMB_ROWS: 'embedding rows do not match the captions (or the caption count is wrong)',
    BAD_IMAGE: 'the image does not decode',
    DUPLICATE: 'a member or a key appears twice in a shard',
    TAR_DAMAGED: 'samples in or next to an unreadable stretch of a tar (the reader resyncs at '
                 'the next valid header)',
    TAR_TRUNCATED: 'samples after the point where a tar is cut short',
    MISSING_SAMPLES: "samples the shard's manifest.jsonl lists that the tar does not hold",
    NO_IMAGE_FOR_UID: 'a reinforced sample whose uid has no image in the image shard',
    IMAGE_WITHOUT_SAMPLE: 'an image whose uid has no reinforced sample',
    SHA256_MISMATCH: 'the image changed since its embeddings were computed',
    EMPTY_CAPTION: 'a caption is empty',
    EMB_WIDTH: "embeddings are not the dataset's width",
    EMB_NONFINITE: 'embeddings hold NaN/Inf',
    EMB_NORM: 'a per-teacher embedding slice is not unit-norm',
    TOO_FEW_AUGMENTATIONS: 'fewer stored augmentations than k',
    SYN_MISMATCH: "synthetic captions per key differ from the dataset's",
    BAD_PAUG: 'a stored augmentation is malformed or does not fit the image',
}


class CorruptSampleError(ValueError):
  """A sample (or a stretch of a shard) that cannot be used, with where it is and why.

  Attributes:
    shard: the file the sample came from.
    key: the sample key inside the shard, or for samples whose keys are unreadable the open
      range of keys around them, e.g. '(000004, 000009)' ('start' / 'end' at the edges).
    reason: a short machine-readable category (see `REASONS`); counters aggregate by it.
    detail: a human-readable explanation.
    count: the samples this error stands for (0 for a damaged stretch that lost no whole
      sample: the samples around it are counted under their own keys).
  """

  def __init__(self, shard: str, key: str, reason: str, detail: str = '', count: int = 1):
    self.shard, self.key, self.reason, self.detail = str(shard), str(key), reason, detail
    self.count = int(count)
    message = f'{self.shard}: sample {self.key!r}: {reason}'
    if self.count != 1:
      message += f' ({self.count} samples)'
    super().__init__(f'{message}: {detail}' if detail else message)

  def __reduce__(self):
    # Exceptions pickle through their args; keep all fields across process boundaries.
    return (CorruptSampleError, (self.shard, self.key, self.reason, self.detail, self.count))

  @property
  def where(self) -> str:
    """'shard:key', the form used in reports."""
    return f'{self.shard}:{self.key}'

  def to_json(self) -> dict[str, Any]:
    """One line of the skipped-samples list."""
    return {'shard': self.shard, 'key': self.key, 'reason': self.reason, 'count': self.count,
            'detail': self.detail}


class BudgetExceededError(RuntimeError):
  """More samples were skipped than the policy allows; the message holds the full summary."""


@dataclasses.dataclass
class SkipCounter:
  """Samples accepted and skipped, by reason, with the first few locations of each reason.

  `seen` = `accepted` + every recorded skip (exempt ones included). Picklable, mergeable
  (`merge`) and JSON round-trippable (`to_json` / `from_json`).
  """
  accepted: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def ok(self, n: int = 1) -> None:
    """Counts `n` good samples."""
    self.accepted += n

  def record(self, error: CorruptSampleError) -> None:
    """Counts `error.count` skipped samples under `error.reason`; keeps early examples."""
    self.skipped[error.reason] += error.count
    shown = self.examples.setdefault(error.reason, [])
    if len(shown) < _EXAMPLES_PER_REASON:
      shown.append(f'{error.where}: {error.detail}' if error.detail else error.where)

  def merge(self, other: 'SkipCounter') -> None:
    """Adds `other`'s counts into this counter (e.g. from a worker process)."""
    self.accepted += other.accepted
    self.skipped.update(other.skipped)
    for reason, shown in other.examples.items():
      mine = self.examples.setdefault(reason, [])
      mine.extend(shown[:_EXAMPLES_PER_REASON - len(mine)])

  @property
  def seen(self) -> int:
    return self.accepted + sum(self.skipped.values())

  def num_skipped(self, exempt: Iterable[str] = ()) -> int:
    """Skipped samples, not counting reasons in `exempt`."""
    exempt = set(exempt)
    return sum(n for reason, n in self.skipped.items() if reason not in exempt)

  def summary(self, log_path: str | None = None) -> str:
    """Multi-line report: totals, one line per reason with its first locations, the list."""
    lines = [f'{self.accepted} samples accepted, {sum(self.skipped.values())} skipped '
             f'(of {self.seen} seen)']
    for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
      lines.append(f'  {reason}: {n}, e.g. ' + '; '.join(self.examples.get(reason, [])))
    if log_path and self.skipped:
      lines.append(f'  every skipped sample (shard, key, reason): {log_path}')
    return '\n'.join(lines)

  def to_json(self) -> dict[str, Any]:
    return {'accepted': self.accepted, 'skipped': dict(self.skipped),
            'examples': self.examples}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> 'SkipCounter':
    return cls(accepted=int(data['accepted']),
               skipped=collections.Counter({k: int(v) for k, v in data['skipped'].items()}),
               examples={k: list(v) for k, v in data['examples'].items()})


class SkipLog:
  """The full list of skipped samples: one JSON object per line (`CorruptSampleError.to_json`
  plus any `extra` fields), appended as skips happen and flushed after each.

  One writer per file: worker processes write their own files and the caller joins them.
  """

  def __init__(self, path: str, extra: dict[str, Any] | None = None):
    self.path = path
    self.extra = dict(extra or {})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    self._file = open(path, 'a', encoding='utf-8')

  def write(self, error: CorruptSampleError, **extra: Any) -> None:
    self._file.write(json.dumps({**error.to_json(), **self.extra, **extra}) + '\n')
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> 'SkipLog':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_skip_log(path: str) -> Iterator[dict[str, Any]]:
  """The rows of a skipped-samples list; a line cut by a crash (the last) is dropped."""
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.endswith('\n'):
        yield json.loads(line)


@dataclasses.dataclass(frozen=True)
class ErrorPolicy:
  """What to do with a corrupt sample: fail at once, or skip and count within a budget.

  Attributes:
    mode: 'fail' raises the first `CorruptSampleError`; 'skip' records it and goes on.
    max_count: in 'skip' mode, the most samples that may be skipped (None: no count limit).
    max_fraction: in 'skip' mode, the largest allowed skipped/seen ratio (None: no limit).
      Checked once `min_seen` samples were seen, and always at the end (`check(final=True)`),
      so a few bad samples at the very start do not abort a long run.
    min_seen: samples seen before `max_fraction` is enforced mid-run.
    exempt: reasons that are counted and reported but never raise and never use the budget
      (e.g. join misses that are expected, like images that failed to download).
  """
  mode: str = 'fail'
  max_count: int | None = None
  max_fraction: float | None = None
  min_seen: int = 10_000
  exempt: frozenset[str] = frozenset()

  def __post_init__(self):
    if self.mode not in ('fail', 'skip'):
      raise ValueError(f"Unknown error policy mode {self.mode!r}: use 'fail' or 'skip'.")
    if self.max_count is not None and self.max_count < 0:
      raise ValueError(f'max_count must be >= 0, got {self.max_count}.')
    if self.max_fraction is not None and not 0 <= self.max_fraction <= 1:
      raise ValueError(f'max_fraction must be in [0, 1], got {self.max_fraction}.')

  @classmethod
  def parse(cls, mode: str, budget: str | float | int | None = None, **kwargs) -> 'ErrorPolicy':
    """Policy from flag values: `budget` is a count ('100') or a fraction ('0.01', '1%').

    A budget with a '.' or '%' or a value below 1 is a fraction; otherwise a count.
    """
    if budget is None:
      return cls(mode=mode, **kwargs)
    if mode != 'skip':
      raise ValueError(f"A corrupt-sample budget ({budget!r}) needs mode 'skip', not {mode!r}.")
    text = str(budget).strip()
    try:
      if text.endswith('%'):
        return cls(mode=mode, max_fraction=float(text[:-1]) / 100, **kwargs)
      value = float(text)
    except ValueError:
      raise ValueError(f'Cannot parse the corrupt-sample budget {budget!r}: give a count such '
                       "as '100' or a fraction such as '0.01' or '1%'.") from None
    if '.' in text or value < 1:
      return cls(mode=mode, max_fraction=value, **kwargs)
    return cls(mode=mode, max_count=int(value), **kwargs)

  def handle(self, error: CorruptSampleError, counter: SkipCounter,
             log: SkipLog | None = None, check_budget: bool = True, **log_extra: Any) -> None:
    """Re-raises `error` (mode 'fail', unless exempt) or records it (and logs it) and checks
    the budget.

    Workers whose counters are merged elsewhere pass `check_budget=False` and leave the check
    to the merging process, which sees the totals.
    """
    if self.mode == 'fail' and error.reason not in self.exempt:
      raise error
    counter.record(error)
    if log is not None:
      log.write(error, **log_extra)
    if check_budget:
      self.check(counter)

  def check(self, counter: SkipCounter, final: bool = False, log_path: str | None = None) -> None:
    """Raises `BudgetExceededError` (with `counter.summary()`) if the budget is exceeded."""
    skipped, seen = counter.num_skipped(self.exempt), counter.seen
    if self.mode == 'fail':
      over = skipped > 0  # Possible only for counters merged from elsewhere.
    else:
      over = self.max_count is not None and skipped > self.max_count
      if self.max_fraction is not None and seen and (final or seen >= self.min_seen):
        over = over or skipped / seen > self.max_fraction
    if over:
      raise BudgetExceededError(
          f'Too many corrupt samples: {skipped} skipped of {seen} seen exceeds the budget '
          f'({self.describe()}).\n{counter.summary(log_path)}\nFix or remove the files named '
          'above, or raise the budget (e.g. --max_corrupt).')

  def describe(self) -> str:
    if self.mode == 'fail':
      return 'fail on the first corrupt sample'
    limits = ([f'at most {self.max_count}'] if self.max_count is not None else []) + (
        [f'at most {self.max_fraction:.4%}'] if self.max_fraction is not None else [])
    return 'skip ' + (' and '.join(limits) if limits else 'without limit')
