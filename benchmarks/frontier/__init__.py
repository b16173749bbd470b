"""`make bench`: the fidelity / speed frontier of every caching method, through the real host's sampler.

For each case (cases.py) every method is swept over its setting; each cached run
is compared with the uncached run of the same graph and seed. Methods: ours, named
"policy+forecaster@site" (names.py; swept over `speed` and --set values); the host's built-in
EasyCache / LazyCache as comfy:EasyCache / comfy:LazyCache (swept over reuse_threshold); and any
other pack's MODEL->MODEL node as PACK:NodeClass (--pack/--node/--param).

Measures (design note 5):
- compute_fraction: the diffusion model's FLOPs in the cached run over the uncached run of the same
  graph (flops.py), per sample, averaged; the same count for ours, the host's nodes and other packs,
  whatever they skip. ideal_speedup = 1 / it. Ours also keep report_fraction, the run report's
  computed block cells / all cells: on a model whose blocks cost the same (Wan) it equals the FLOP
  fraction of the blocks, and compute_fraction = s + (1 - s) * report_fraction, s being the share of
  the FLOPs outside the blocks (embeddings, head), which every evaluation still runs at a block site.
- wallclock_speedup: median sampler time of interleaved uncached runs / of the cached runs, in one
  process, apart from the FLOP-counted runs. The sampler time comes from the host's progress hook,
  which the sampler calls after every step: it excludes graph validation, model loading and decoding,
  which caching does not change. The first step ends before the first call; it is computed by every method, and is
  counted at the uncached per-step time. efficiency = wallclock_speedup / ideal_speedup.
- psnr / ssim of the decoded output (latent_psnr of the final latent), mean over the samples;
  identical outputs count as PSNR_CAP dB. cache_bytes: the peak bytes our caches held.
A setting that fails is recorded with status "failed" and its full error; the run goes on.
Writes frontier.json (records), frontier.md (tables) and frontier.png (PSNR vs ideal speedup).

Files: cases.py (models, schedules, samples), names.py (our method names), methods.py (methods and
their sweeps), peers.py (other packs), measure.py (running and measuring), flops.py (compute),
report.py (tables, plot), cli.py (command line).
"""
from benchmarks.frontier.cli import main
from benchmarks.frontier.measure import PSNR_CAP
from benchmarks.frontier.methods import DEFAULT_METHODS

__all__ = ["main", "PSNR_CAP", "DEFAULT_METHODS"]
