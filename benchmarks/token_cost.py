"""Wall-clock of one real-width Wan block on all tokens vs the token-level partial path.

`python -m benchmarks.token_cost --tokens 1024 --text 512 --ratio 0.25` builds one host Wan 2.1 block at
1.3B widths (dim 1536, ffn 8960, 12 heads; random weights, float32) and times, best of `--repeats`:
the block on every token, and the partial path (cache_core's gather of the token rows and their rotary
rows, the block on the subset, the fill plus the scatter of the subset's rows). The sampler-level
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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    host_module.boot(cpu=not torch.cuda.is_available())
    import comfy.ldm.wan.model as wan
    import comfy.ops
    from cache_core import TokenLayout
    from cache_core.tokens import gather

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
    layout = TokenLayout("img", rows=(("pe", 1), ("vec", 1)))
    index = torch.randperm(args.tokens, device=device)[: max(1, round(args.ratio * args.tokens))].sort().values
    fill = torch.randn_like(full["img"])

    def run(a):
        return block(a["img"], e=a["vec"], freqs=a["pe"], context=a["txt"])

    def partial():
        sub = gather(full, layout, ("img",), index, 0)
        return (full["img"] + fill).index_copy(1, index, run(sub))

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
        full_s, partial_s = best(lambda: run(full)), best(partial)
    print(f"Wan 1.3B-width block, {args.tokens} tokens + {args.text} text, ratio {args.ratio:g}, {device}: "
          f"full {full_s * 1000:.0f} ms, partial {partial_s * 1000:.0f} ms, cost {partial_s / full_s:.3f} "
          f"(ideal {index.numel() / args.tokens:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
