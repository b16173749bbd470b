"""Wall-clock of one real-width Wan block on all tokens vs the token-level partial path.

`python -m benchmarks.token_cost --tokens 1024 --text 512 --ratio 0.25` builds one host Wan 2.1 block at
1.3B widths (dim 1536, ffn 8960, 12 heads; random weights, float32) and times, best of `--repeats`:
the block on every token, and the partial path (cache_core's gather of the token rows and their rotary
rows, the block on the subset, the fill plus the scatter of the subset's rows), with the subset's
self-attention over the cached keys and values of every token (through the host's attention override,
as the Cache Token Ratio's `cached_attention` does) and over the subset only. The sampler-level
number is the real-dims slice's partial step cost (benchmarks/frontier.py); this isolates one block so
token counts of real images (thousands) fit in CPU time.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks import host as host_module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--text", type=int, default=512, help="text tokens (Wan 2.1 pads its prompt to 512)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    host_module.boot(cpu=not torch.cuda.is_available())
    import comfy.ldm.wan.model as wan
    import comfy.ops
    from cache_core import AttentionLayout, TokenLayout
    from cache_core.tokens import SelfAttention, gather, positions_of

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dim, ffn, heads = 1536, 8960, 12
    torch.manual_seed(0)
    block = wan.WanAttentionBlock("t2v_cross_attn", dim, ffn, heads,
                                  operation_settings={"operations": comfy.ops.disable_weight_init})
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    block.to(device)
    d = dim // heads
    rope = wan.EmbedND(dim=d, theta=10000.0, axes_dim=[d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)])
    side = max(1, int(args.tokens ** 0.5))
    ids = torch.zeros(1, args.tokens, 3, device=device)
    ids[..., 1] = torch.arange(args.tokens, device=device) // side
    ids[..., 2] = torch.arange(args.tokens, device=device) % side
    full = {"img": torch.randn(2, args.tokens, dim, device=device), "txt": torch.randn(2, args.text, dim, device=device),
            "vec": torch.randn(2, 1, 6, dim, device=device), "pe": rope(ids).movedim(1, 2)}
    attention = AttentionLayout(sequence_dim=1)
    layout = TokenLayout("img", rows=(("pe", 1), ("vec", 1)), attention=attention)
    index = torch.randperm(args.tokens, device=device)[: max(1, round(args.ratio * args.tokens))].sort().values
    fill = torch.randn_like(full["img"])
    kept = {}

    def run(a, hook=None):
        options = {} if hook is None else {"optimized_attention_override": lambda func, *x, **kw: hook(func, *x, **kw)}
        return block(a["img"], e=a["vec"], freqs=a["pe"], context=a["txt"], transformer_options=options)

    def partial(cached: bool):
        sub = gather(full, layout, ("img",), index, 0, all_keys=cached)
        hook = SelfAttention(attention, lambda k, v: kept.update(kv=(k, v)), kept["kv"], positions_of(index, 0))
        return (full["img"] + fill).index_copy(1, index, run(sub, hook if cached else None))

    def best(f):
        f()
        times = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            f()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        run(full, SelfAttention(attention, lambda k, v: kept.update(kv=(k, v))))  # a computed step keeps them
        full_s, cached_s, subset_s = best(lambda: run(full)), best(lambda: partial(True)), best(lambda: partial(False))
    print(f"Wan 1.3B-width block, {args.tokens} tokens + {args.text} text, ratio {args.ratio:g}, {device}: "
          f"full {full_s * 1000:.0f} ms; partial attending to cached keys {cached_s * 1000:.0f} ms, cost "
          f"{cached_s / full_s:.3f}; partial attending to the subset {subset_s * 1000:.0f} ms, cost "
          f"{subset_s / full_s:.3f} (ideal {index.numel() / args.tokens:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
