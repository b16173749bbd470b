"""ComfyUI-FeatureCache: feature caching (reuse and forecasting of model features) for faster diffusion sampling."""
from .nodes.nodes import FeatureCacheExtension

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    return FeatureCacheExtension()
