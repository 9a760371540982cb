"""What every launcher shares: one clear message per user error, the traceback only on request.

  cli.run(main)                       absl's app.run, with user errors printed as `error: ...`
                                      (exit status 2); --verbose re-raises them with the trace
  argv, evals = cli.config_argv(argv) checks a --config file and its overrides before absl
                                      parses them (a missing file, an unknown preset or key is
                                      one line, not a traceback) and takes out --config.evals.*
"""
import logging
import sys
from typing import Any, Callable, Dict, List, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging as absl_logging

from mobileclip_jax import config as config_lib
from mobileclip_jax.data import errors as data_errors
from mobileclip_jax.train import workdir

_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the full traceback of an error.')

# Errors a user causes and can fix from the message: bad paths, configs, data, a busy workdir.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ValueError, FloatingPointError, workdir.WorkdirError,
               data_errors.BudgetExceededError)


def _exit(error: BaseException) -> None:
  sys.stderr.write(f'error: {type(error).__name__}: {error}\n'
                   '(rerun with --verbose for the traceback)\n')
  sys.exit(2)


def set_log_levels() -> None:
  """INFO for this package, WARNING for the rest (Orbax/Grain INFO lines drown the logs)."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('mobileclip_jax').setLevel(logging.INFO)


def run(main: Callable[[Sequence[str]], Any]) -> None:
  """app.run(main) with INFO logs of this package and one message per user error."""

  def guarded(argv):
    set_log_levels()
    try:
      return main(argv)
    except USER_ERRORS as e:
      if _VERBOSE.value:
        raise
      _exit(e)

  app.run(guarded)


def config_argv(argv: Sequence[str], flag: str = 'config'
                ) -> Tuple[List[str], Dict[str, Dict[str, Any]]]:
  """(argv without the evaluator overrides, those overrides); fails in one line on a config file
  that does not load or an override of a key it does not have."""
  argv, evals = config_lib.pop_eval_overrides(argv, flag)
  if any(a == f'--{flag}' for a in argv):
    raise SystemExit(f'error: write --{flag}=PATH (with "="), e.g. '
                     f'--{flag}=configs/mobileclip2.py:s0.')
  try:
    config_lib.check_overrides(argv, flag)
  except USER_ERRORS + (SyntaxError, ImportError, AttributeError) as e:
    if '--verbose' in argv:
      raise
    _exit(e)
  return argv, evals
