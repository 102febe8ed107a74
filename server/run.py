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
    pool = PoolConfig(
        slots=config.parallel,
        queue=config.queue,
        context=config.context,
        prefix=shared_chat_prefix(bundle) if config.prefix_cache else (),
    )
    with BatchScheduler(decoder, bundle.tokenizer, bundle.stop_ids, pool) as scheduler:
        app = create_app(bundle, scheduler, config)
        log(
            f"edgepack serve: {bundle.name} on http://{_url_host(config.host)}:{config.port}/v1 "
            f"({pool.slots} slots x {scheduler.context} tokens, KV cache {format_bytes(scheduler.cache.nbytes)}, "
            f"shared prefix {len(pool.prefix)} tokens, "
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


def shared_chat_prefix(bundle) -> tuple[int, ...]:
    """The tokens every chat request with the bundle's system prompt starts with (the server adds that prompt
    when a request has none, as `edgepack generate` does): the common prefix of the chat template rendered for
    different user messages, less its last token (a tokenizer may merge across the boundary; the scheduler
    compares tokens before reusing anything, so this only decides how often it can)."""
    system = bundle.system_prompt
    head = [{"role": "system", "content": system}] if system else []
    renders = [bundle.tokenizer.encode_chat(head + [{"role": "user", "content": t}]) for t in ("Hello", "1", "?x")]
    n = 0
    while all(len(r) > n for r in renders) and len({r[n] for r in renders}) == 1:
        n += 1
    return tuple(renders[0][: max(n - 1, 0)])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
