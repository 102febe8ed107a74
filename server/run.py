"""Open the bundle, start the batching scheduler, run uvicorn until interrupted."""

from __future__ import annotations

from collections.abc import Callable

import uvicorn

from runtime.batching import BatchScheduler, PoolConfig
from runtime.bundle import Bundle, format_bytes
from server.app import create_app
from server.config import ServeConfig


def serve(bundle_path, config: ServeConfig, log: Callable[[str], None] = print, trust=None) -> int:
    """trust: runtime.signing.TrustPolicy (None: the user's trust file, unsigned bundles allowed with a warning)."""
    bundle = Bundle.open(bundle_path, trust=trust)
    log(f"edgepack: {bundle.signature.message(bundle.name)}")
    decoder = bundle.decoder(config.threads)
    pool = PoolConfig(slots=config.parallel, queue=config.queue, context=config.context)
    with BatchScheduler(decoder, bundle.tokenizer, bundle.stop_ids, pool) as scheduler:
        app = create_app(bundle, scheduler, config)
        log(
            f"edgepack serve: {bundle.name} on http://{_url_host(config.host)}:{config.port}/v1 "
            f"({pool.slots} slots x {scheduler.context} tokens, KV cache {format_bytes(scheduler.cache.nbytes)}, "
            f"queue {pool.queue}{', API key required' if config.api_key else ''})"
        )
        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            limit_concurrency=pool.slots + pool.queue + 64,
            timeout_graceful_shutdown=5,
        )
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
