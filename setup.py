"""mobileclip_jax: MobileCLIP / MobileCLIP2 training with multi-modal reinforced data in JAX/Flax."""
import setuptools

# Compatible ranges: from the versions CI tests (exact pins in constraints.txt, Python 3.11) up to
# the newest release checked on Python 3.12 (jax 0.11.2; jax >= 0.11 needs 3.12), so that
# `pip install` next to an accelerator's jax does not downgrade it. Widen an upper bound only
# after running the suite on that release.
JAX_RANGE = '>=0.10.2,<0.12'
INSTALL_REQUIRES = [
    'jax' + JAX_RANGE,
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'tensorflow-datasets>=4.9.10,<4.10',
    'array_record>=0.8.6,<0.9',
    'grain>=0.2.18,<0.3',
    'sentencepiece>=0.2.3,<0.3',
    'ml_collections>=1.1.0,<1.2',
    'numpy>=2.0,<2.6',
    'pillow>=11,<14',
    'ftfy>=6.1',
    'regex',
    'absl-py',
    'etils',
    'tqdm',
    'safetensors>=0.4',
    'matplotlib',
]

# The PyTorch reference stack for parity tests and benchmarks. torch must be pinned in the same
# install command as open-clip-torch/timm: otherwise pip resolves a newer torchvision that
# pulls a multi-GB CUDA build of torch.
TORCH_REFERENCE = [
    'torch==2.13.0',
    'torchvision==0.28.0',
    'open-clip-torch==3.3.0',
    'timm==1.0.31',
]

# Apache Beam, for `launch/build_dataset.py --runner=beam` (datasets too large for one machine).
# 2.77.0 installs beside the pins above (it takes pillow 12.x, protobuf 6.x, pyarrow 25.x, all in
# range). Dataflow also needs its GCP extras: pip install 'apache-beam[gcp]==2.77.0' gcsfs.
BEAM = ['apache-beam==2.77.0']

# Mobile export (mobileclip_jax/export): ONNX, TFLite (LiteRT) and Core ML towers and the
# runtimes that check them. jax2onnx (ONNX from the tower's jaxpr) is installed on its own with
# `pip install --no-deps jax2onnx==0.17.1`: its metadata pins orbax-checkpoint<0.11.37 against
# the pin above, and its conversion path imports no orbax (see export/onnx_format.py).
EXPORT = [
    'onnx==1.23.2',
    'onnx-ir==1.1.0',
    'onnxruntime==1.32.0',
    'tensorflow-cpu==2.21.0; sys_platform == "linux"',
    'tensorflow==2.21.0; sys_platform != "linux"',
    'ai-edge-litert==2.3.0',
    'coremltools==9.0',
]

setuptools.setup(
    name='mobileclip_jax',
    version='0.1.0',
    description=__doc__,
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['mobileclip_jax', 'mobileclip_jax.*']),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # The accelerator builds of the same jax: `pip install -e '.[cuda12]'` on NVIDIA GPUs
        # (CUDA 12 wheels from PyPI, no system CUDA needed), `'.[tpu]'` on Cloud TPU VMs (libtpu).
        'cuda12': ['jax[cuda12]' + JAX_RANGE],
        'tpu': ['jax[tpu]' + JAX_RANGE],
        'torch': TORCH_REFERENCE,
        'beam': BEAM,
        # transformers: open_clip 3.3's CoCa.generate (the decoding tests' reference) needs < 4.56
        # (newer ones moved BeamSearchScorer); 4.55 pins huggingface_hub < 1.0.
        # pytest-xdist: the fast suite runs in two worker processes (README's test command).
        # tensorboardX: the reference the event files (train/reporting.py) are checked against.
        'test': TORCH_REFERENCE + ['pytest>=9.2,<10', 'pytest-xdist>=3.8,<4',
                                   'scikit-image>=0.26,<0.27', 'portpicker',
                                   'transformers>=4.55.4,<4.56', 'tensorboardX>=2.6.5,<2.7'],
        'export': EXPORT,
    },
)
