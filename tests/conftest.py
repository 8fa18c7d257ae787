import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

import torch  # noqa: E402

# The test models are tiny: a second intra-op thread only adds synchronization (and contention on a
# shared 2-core machine). Tests that run real models raise it themselves.
torch.set_num_threads(1)
