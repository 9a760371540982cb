"""mobileclip_jax: MobileCLIP / MobileCLIP2 training with multi-modal reinforced data in JAX/Flax."""
import setuptools

# Pinned to the newest releases that work together on Python 3.11 (jax>=0.11 needs 3.12).
# Bump them together and rerun the whole test suite: sharding, Orbax and TFDS APIs move fast.
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'tensorflow-datasets==4.9.10',
    'array_record==0.8.6',
    'grain==0.2.18',
    'sentencepiece==0.2.3',
    'ml_collections==1.1.0',
    'numpy>=2.0,<2.5',
    'pillow>=11,<14',
    'ftfy>=6.1',
    'regex',
    'absl-py',
    'etils',
    'tqdm',
    'tensorboardX==2.6.5',
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
        'torch': TORCH_REFERENCE,
        'beam': BEAM,
        # open_clip 3.3's CoCa.generate needs transformers < 4.56 (newer ones moved
        # BeamSearchScorer); 4.55.4 pins huggingface_hub < 1.0.
        'test': TORCH_REFERENCE + ['pytest==9.2.0', 'scikit-image==0.26.0', 'portpicker',
                                   'transformers==4.55.4'],
    },
)
