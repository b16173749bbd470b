"""Every family the adapters describe, built tiny with the host's own classes, at every site (make coverage)."""
import json

from benchmarks import coverage


def test_every_family_is_ok_at_every_site_on_this_host(host, tmp_path):
    result = coverage.run(out_dir=str(tmp_path))
    print("\n" + coverage.format_matrix(result))
    assert json.loads((tmp_path / "coverage.json").read_text()) == result["matrix"]
    assert set(result["matrix"]) == set(coverage.FAMILIES)
    for name, row in result["matrix"].items():
        available = coverage.host_has(coverage.FAMILIES[name])
        expected = {site: coverage.OK if available else coverage.NA for site in coverage.SITES}
        if "U-Net" in name:  # DeepCache: one deep branch, no per-block site
            expected["blocks"] = coverage.NA
        if name == "Cosmos 1":  # its blocks take batch-last hidden states: whole-model site only
            expected.update(span=coverage.NA, blocks=coverage.NA)
        assert row == expected, (name, row, result["errors"])


def test_declared_image_token_grids_match_what_the_blocks_see(host, product):
    """Each adapter's patch gives as many grid cells as the image tokens its blocks receive (last rows)."""
    adapters = product("nodes.adapters")
    checked = []
    for name, family in coverage.FAMILIES.items():
        if not coverage.host_has(family) or "U-Net" in name or name == "Cosmos 1":
            continue
        if name == "Flux Kontext":  # reference tokens follow the image tokens: no grid is claimed (test below)
            continue
        model = coverage.build(family)
        adapter = adapters.adapter_for(model.model.diffusion_model)
        if not adapter.has_token_grid:
            continue
        seen, hooks, spied = {}, [], model.clone()
        for kind in adapter.kinds:
            for stream in kind.image_streams:
                record = lambda rows, kind=kind.name, stream=stream: seen.setdefault((kind, stream), rows)
                if adapter.hook == adapters.REPLACE:
                    spied.set_model_patch_replace(
                        lambda args, extra, record=record, stream=stream: (record(args[stream].shape[1]),
                                                                           extra["original_block"](args))[1],
                        "dit", kind.name, 0)
                else:
                    block = adapter.blocks(model.model.diffusion_model, kind)[0]
                    hooks.append(block.register_forward_pre_hook(
                        lambda module, args, kwargs, record=record, stream=stream:
                            (record((args[0] if args else kwargs[stream]).shape[1]), None)[1], with_kwargs=True))
        try:
            coverage.sample(spied, family)
        finally:
            for h in hooks:
                h.remove()
        for kind in adapter.kinds:
            for stream in kind.image_streams:
                patch = adapter.patch_of(model.model.diffusion_model)
                grid = adapter.token_grid(kind.name, stream, family.latent, patch)
                rows = seen[(kind.name, stream)]
                text_first = kind.name == "single_block"  # cat(txt, img): the image tokens are the last rows
                assert rows > grid.tokens if text_first else rows == grid.tokens, (name, kind.name, rows, grid)
        checked.append(name)
    assert "Flux" in checked and "PixArt" in checked and len(checked) >= 10, checked


def test_reference_latents_claim_no_image_token_grid(host, product):
    """Kontext's streams are cat(img, ref): a grid over the last rows would pick the reference tokens."""
    family = coverage.FAMILIES["Flux Kontext"]
    if not coverage.host_has(family):
        return
    integration, core = product("nodes.integration"), product("cache_core")
    config = core.CacheConfig(policy=core.make_policy(method="fixed", threshold=2.0, warmup_steps=0),
                              forecaster=core.ForecasterConfig(kind="freqca"),
                              site=core.Site(kind="span", probe_blocks=1))
    handle = integration.CacheHandle()
    latent = coverage.sample(integration.install(coverage.build(family), config, handle), family)
    assert bool(latent.isfinite().all())
    assert any("reference latents" in note for note in handle.last["notes"]), handle.last["notes"]
