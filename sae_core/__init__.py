"""The torch-free core both sides stand on: the contracts the PyTorch side (``extractor``) and the
JAX side (``jax_sae``, ``discovery``) share, and nothing else.

- ``store``: the activation store, the one owner of its on-disk layout; ``location``: where a
  store lives (a directory, ``gs://``, ``s3://``);
- ``files``: atomic writes; ``errors``: ``UsageError`` and the one-line exit; ``cli``: the
  runner that turns a config dataclass into flags; ``lazy``: lazy package attributes;
- ``formats``: the torch and SAELens export payloads; ``eval_file``: ``eval.json``;
  ``audio``: audio files in and out (soundfile).

Needs numpy, tensorstore and (for audio) soundfile; never torch, transformers or JAX
(``tests/test_layers.py`` checks the imports of every module).
"""

import os as _os

# Before tensorstore starts (it reads these once): a bucket connection that delivers nothing for a
# minute is dropped and retried under the retry policy (``location.STALL_SECONDS``), instead of
# waiting forever on a server that accepted the request and went silent.
_os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", "60")
_os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")

