"""The chunked output layer alone, forward + backward, its softmax recomputed in backward (budget 0)
or kept (2^28), alternated; SmolLM2's shape, logits of a real spread (weights N(0, 0.27)); see
head_saved_softmax.txt. Run from the repository root with PYTHONPATH=."""
import time, torch
from dpo_lib.core import logps
torch.manual_seed(0)
V, H = 49152, 576
for M in (500, 1500):
    head = torch.nn.Linear(H, V, bias=False); head.weight.requires_grad_(False); head.weight.data.normal_(0, 0.27)
    hidden = torch.randn(1, M, H, requires_grad=True); targets = torch.randint(0, V, (1, M))
    res = {0: [], 1 << 28: []}
    for rep in range(6):
        for saved in ((0, 1 << 28) if rep % 2 else (1 << 28, 0)):
            logps.SAVED_SOFTMAX_ELEMENTS = saved
            t = time.perf_counter()
            logps.head_logps(hidden, head, targets).sum().backward()
            res[saved].append(time.perf_counter() - t)
    print(M, {k: round(sum(v[1:]) / len(v[1:]), 3) for k, v in res.items()})
