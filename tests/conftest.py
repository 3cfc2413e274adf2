import os

os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

from drivepriv.federation.flower_support import OFFLINE_ENV  # noqa: E402

# Flower and Ray read these when imported: no telemetry, usage statistics or downloads in tests
os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()})

import torch  # noqa: E402

# The attacks' batched searches are many small operations: on the 2-core machines we run on,
# a second intra-op thread only adds contention (measured: the batch-of-eight rgia-k test
# 31 s with torch's default threads, 8 s with one, while another process was busy).
torch.set_num_threads(1)
torch.backends.mkldnn.enabled = False  # as drivepriv's command line: reproducible float32 kernels
