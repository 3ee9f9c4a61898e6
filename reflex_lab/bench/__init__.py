"""bench.py's measurements: contenders, interleaved timing, memory, generation, report.

Everything runs in one process on one machine, so the ratios compare like with like:

* peak: large float32 and bfloat16 matmuls in JAX and in PyTorch; the peak of a dtype is the faster
  of the two, measured between the training steps so it sees the same machine load (peak.py);
* training: this project's train step (the `TrainProgram` `train.py` trains with, the very
  executable it runs, fed the bench's own batch) for the `all` and `none` schedules, against the
  same architecture written plainly in PyTorch (torch_peer.py: nanoGPT style,
  `scaled_dot_product_attention`), eager and `torch.compile`, with the same weights, batch, AdamW
  and clipping (train.py);
* generation: KV-cache `Generator` vs re-running the whole prefix per token (what the original
  did), and for the vanilla GPT-2 config against HF `GPT2LMHeadModel.generate` on the same weights
  (generation.py);
* KV-cache bytes, reflex vs vanilla (report.py);
* the ablation: the train step with its optimised kernels switched on one by one (ablation.py).

Timed repetitions of the contenders alternate (A B C, C B A, ...) and the report uses medians
(timing.py). suite.py runs the whole benchmark, cli.py is `bench.py`'s command line; what the
numbers mean is in docs/bench.md.
"""
