"""`launch/benchmark.py compile`'s thunk count: the ENTRY computation's running instructions only
(not the fused computations' insides, not parameters, tuples or bitcasts)."""
import jax
import jax.numpy as jnp
import pytest

from mobileclip_jax.benchmark import compile as compile_bench

HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0}, f32[4]{0})->(f32[4]{0}, f32[])}

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  %constant.1 = f32[] constant(2)
  %broadcast.1 = f32[4]{0} broadcast(%constant.1), dimensions={}
  ROOT %multiply.1 = f32[4]{0} multiply(%param_0, %broadcast.1)
}

ENTRY %main.10 (Arg_0.1: f32[4], Arg_1.2: f32[4]) -> (f32[4], f32[]) {
  %Arg_0.1 = f32[4]{0} parameter(0)
  %Arg_1.2 = f32[4]{0} parameter(1)
  %constant.3 = f32[] constant(0)
  %multiply_fusion = f32[4]{0} fusion(%Arg_0.1), kind=kLoop, calls=%fused_computation
  %copy.1 = f32[4]{0} copy(%Arg_1.2)
  %bitcast.2 = f32[2,2]{1,0} bitcast(%copy.1)
  %while.1 = (f32[4]{0}, s32[]) while(%tuple.0), condition=%cond, body=%body
  %get-tuple-element.1 = f32[4]{0} get-tuple-element(%while.1), index=0
  %reduce_fusion = f32[] fusion(%multiply_fusion, %constant.3), kind=kLoop, calls=%fused_computation
  ROOT %tuple.2 = (f32[4]{0}, f32[]) tuple(%get-tuple-element.1, %reduce_fusion)
}
"""


def test_counts_the_entry_computations_running_instructions():
  assert compile_bench.entry_thunks(HLO) == {'fusion': 2, 'copy': 1, 'while': 1}


def test_counts_a_compiled_program_and_refuses_text_without_an_entry():
  def f(xs):  # Independent outputs: one kernel each at least (the matmul's too).
    return [x * 2 + 1 for x in xs] + [xs[0] @ xs[1]]
  xs = [jnp.ones((16, 16)) * i for i in range(4)]
  thunks = compile_bench.entry_thunks(jax.jit(f).lower(xs).compile().as_text())
  assert sum(thunks.values()) >= 5 and not set(thunks) & {'parameter', 'tuple', 'constant'}
  with pytest.raises(ValueError, match='No ENTRY'):
    compile_bench.entry_thunks(HLO.split('ENTRY')[0])
