"""Weight inheritance (TinyCLIP, Wu et al. ICCV 2023): smaller students that start from a
trained model's weights, chosen by hand, by importance, or by learned masks.

  variables, child_config = mobileclip_jax.inherit(variables, 'MobileCLIP2-S2',
                                                   {'text.layers': 6, 'image.widths': ...})

units.py      which axes of which tensors every removable unit owns (one table per model)
slicing.py    `inherit`: the keep spec (its keys are documented there) -> child config + weights
importance.py weight-magnitude scores, first-k, uniform layer spacing
masks.py      learned inheritance: `MaskedCLIP` (hard-concrete gates trained by the one trainer
              with the sparsity constraint as the step's regularizer), `keep_from_masks`
batchnorm.py  re-estimating BatchNorm statistics of a sliced model on training batches
stages.py     targets (`--target=VARIANT`, parameter fractions) and the progressive schedule
"""
from mobileclip_jax.inheritance.slicing import KEYS
from mobileclip_jax.inheritance.slicing import inherit
