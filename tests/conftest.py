import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before
# any kernel is decorated, so before fastdiff.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))
