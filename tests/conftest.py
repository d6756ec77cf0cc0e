import torch

# Two cores: keep intra-op threads bounded so test timings stay predictable.
torch.set_num_threads(2)
