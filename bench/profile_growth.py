"""Where the time of a last-row capture goes at 8192 tokens: one plain forward and one captured forward of SmolLM2
under torch.profiler (1 thread), operator tables printed. The capture's own operators (the row recomputation's bmm,
index_select and select) are what it adds; the model's operators are the same calls in both runs, so a difference
in their time is the machine, not the capture. Run: python bench/profile_growth.py [TOKENS]"""
import sys
import time, torch, attnscope
torch.set_num_threads(1)
m = attnscope.load("smollm2-135m")
T = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
ids = torch.randint(100, 20000, (1, T))
x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
from torch.profiler import profile, ProfilerActivity
def plain():
    with torch.no_grad(): m.hf(**x, logits_to_keep=1)
def cap():
    with torch.no_grad(), attnscope.capture(m, queries="last"): m.hf(**x, logits_to_keep=1)
for f in (plain, cap):
    with profile(activities=[ProfilerActivity.CPU]) as p:
        t=time.perf_counter(); f(); print(f.__name__, round(time.perf_counter()-t,2), flush=True)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
