"""sglang plugin entry point (group ``sglang.srt.plugins``): ``register()``.

sglang calls ``register()`` in the launcher and again in every scheduler,
detokenizer and DP-controller process (``load_plugins``), then applies the hooks.
Everything OSCAR changes in sglang 0.5.23 is listed in :data:`HOOKED_TARGETS`
(a test asserts each still exists) plus the attention-backend registry entry.

The hooks only act when the ``oscar`` attention backend is selected; otherwise
sglang behaves exactly as without this package.
"""

from __future__ import annotations

import argparse
import logging

from oscar_sglang import health
from oscar_sglang.settings import BACKEND_NAME, OscarError, is_enabled, load_settings

logger = logging.getLogger(__name__)

_SA = "sglang.srt.server_args.ServerArgs"
_KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_POOLCFG = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
_PAGED = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator"
_TOKEN = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator"

HOOKED_TARGETS = (
    f"{_SA}.add_cli_args",
    f"{_SA}.from_cli_args",
    f"{_SA}.resolve_once",
    "sglang.srt.arg_groups.attention_hook.handle_attention_backend_compatibility",
    f"{_KVC}._build_token_to_kv_pool",
    f"{_POOLCFG}.__init__",
    f"{_PAGED}._release_page_ids",
    f"{_PAGED}.clear",
    f"{_TOKEN}.free",
    f"{_TOKEN}.clear",
    *health.HOOKED_TARGETS,
)

# BF16 window capacity: recent-window rings for this many concurrently running
# requests (more share rings, degrading their window tokens to INT2), and sink rows
# for this many distinct cached sequence starts per ring.
_MAX_RING_BLOCKS = 64
_SINK_SETS_PER_RING = 4


def window_shape(settings, req_slots: int) -> tuple[int, int]:
    """(ring_blocks, sink_rows) of the window buffers for a request pool of req_slots rows."""
    blocks = max(1, min(req_slots, _MAX_RING_BLOCKS))
    return blocks, settings.sink * _SINK_SETS_PER_RING * blocks


# ------------------------------------------------------------------- CLI flag
def _add_cli_args(result, parser: argparse.ArgumentParser):
    parser.add_argument(
        "--oscar",
        metavar="ROTATIONS",
        default=None,
        help="Serve with the OSCAR 2-bit rotated KV cache using this rotations file "
        "(from `python -m oscar_sglang.calib`). Same as --attention-backend oscar "
        "--quantization-param-path ROTATIONS.",
    )


def _from_cli_args(server_args, cls, args: argparse.Namespace):
    path = getattr(args, "oscar", None)
    if path:
        server_args.attention_backend = BACKEND_NAME
        server_args.quantization_param_path = path
    return server_args


def _hf_config(server_args):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        server_args.model_path, trust_remote_code=server_args.trust_remote_code, revision=server_args.revision
    )


def _check_before_launch(result, server_args):
    """Refuse bad configurations in the launching process, before anything starts."""
    if is_enabled(server_args):
        load_settings(server_args, _hf_config(server_args))


def _decode_only_cuda_graphs(result, server_args):
    """Decode is graph-capturable (fixed-size metadata buffers); extend is not (its
    chunk metadata has data-dependent shapes): prefill runs eagerly."""
    from sglang.srt.arg_groups import attention_hook as ah

    if ah.resolved_view(server_args).attention_backend != BACKEND_NAME:
        return
    cfg = ah.with_phase(ah.resolving_view(server_args).cuda_graph_config, ah.Phase.PREFILL, backend=ah.Backend.DISABLED)
    ah.declare_resolution(server_args, "oscar_decode_only_cuda_graphs", cuda_graph_config=cfg)


# ----------------------------------------------------------------- the pool
def _build_token_to_kv_pool(original, kvc, *, sizes, is_dsa_model, is_dsv4_model, req_to_token_pool):
    if not is_enabled(kvc.server_args):
        return original(kvc, sizes=sizes, is_dsa_model=is_dsa_model, is_dsv4_model=is_dsv4_model,
                        req_to_token_pool=req_to_token_pool)
    from sglang.srt.runtime_context import get_exec, get_parallel

    from oscar_sglang.pool import OscarKVPool

    if kvc.use_mla_backend or is_dsa_model or is_dsv4_model:
        raise OscarError("--oscar cannot serve MLA/DSA models: they have no per-head K/V to rotate.")
    if kvc.is_hybrid_swa or kvc.mambaish_config is not None:
        raise OscarError("--oscar serves full-attention models only (this one is hybrid SWA/linear/mamba).")
    settings, _ = load_settings(kvc.server_args, kvc.model_config.hf_config)
    parallel = get_parallel()
    ring_blocks, sink_rows = window_shape(settings, req_to_token_pool.req_to_token.shape[0])
    pool = OscarKVPool(
        sizes.max_total_num_tokens,
        kvc.pool_page_size,
        kvc.model_config.dtype,
        kvc.model_config.get_num_kv_heads(parallel.attn_tp_size, parallel.attn_dcp_size),
        kvc.model_config.head_dim,
        kvc.layer_info.num_effective_layers,
        kvc.device,
        layout=settings.layout,
        sink=settings.sink,
        recent=settings.recent,
        ring_blocks=ring_blocks,
        sink_rows=sink_rows,
        enable_memory_saver=get_exec().features.enable_memory_saver,
        start_layer=kvc.layer_info.start_layer,
        end_layer=kvc.layer_info.end_layer,
    )
    logger.info(
        "OSCAR KV pool: %d tokens, %d B/row, windows %d+%d (%.1f MiB)",
        sizes.max_total_num_tokens, settings.layout.row_bytes, settings.sink, settings.recent,
        pool.window_bytes() / 2**20,
    )
    return pool


def oscar_cell_size(row_bytes: int, kv_heads: int, num_layers: int) -> int:
    """Bytes one token slot costs: K and V storage rows in every layer + its window-map entry."""
    return 2 * num_layers * kv_heads * row_bytes + 8


def window_reservation_bytes(settings, kv_heads: int, num_layers: int, req_slots: int, itemsize: int) -> int:
    ring_blocks, sink_rows = window_shape(settings, req_slots)
    rows = sink_rows + ring_blocks * settings.recent
    return 2 * num_layers * rows * kv_heads * settings.head_dim * itemsize + rows * 8


def _size_pool(result, poolcfg, kvc):
    """Charge the true bytes: rows per token, the BF16 windows as a fixed reservation."""
    if not is_enabled(kvc.server_args) or poolcfg._cell_size == 0:
        return
    from sglang.srt.runtime_context import get_parallel

    settings, _ = load_settings(kvc.server_args, kvc.model_config.hf_config)
    parallel = get_parallel()
    kv_heads = kvc.model_config.get_num_kv_heads(parallel.attn_tp_size, parallel.attn_dcp_size)
    layers = kvc.layer_info.num_effective_layers
    poolcfg._cell_size = oscar_cell_size(settings.layout.row_bytes, kv_heads, layers)
    # the request table (and so the pool's rings) has max_running_requests + 1 rows (one padding row)
    running = kvc.server_args.max_running_requests
    req_slots = running + 1 if running else _MAX_RING_BLOCKS
    itemsize = kvc.model_config.dtype.itemsize
    poolcfg._fixed_overhead_bytes += window_reservation_bytes(settings, kv_heads, layers, req_slots, itemsize)


# ------------------------------------------------------- slot lifetime hooks
def _oscar_pool(allocator):
    from oscar_sglang.pool import OscarKVPool

    pool = allocator.get_kvcache()
    return pool if isinstance(pool, OscarKVPool) else None


def _on_release_pages(result, allocator, *page_ids):
    pool = _oscar_pool(allocator)
    if pool is not None:
        for ids in page_ids:
            pool.release_pages(ids)


def _on_free_tokens(result, allocator, free_index):
    pool = _oscar_pool(allocator)
    if pool is not None:
        pool.release_slots(free_index)


def _on_clear(result, allocator):
    pool = _oscar_pool(allocator)
    if pool is not None:
        pool.reset_windows()


# ----------------------------------------------------------------- backend
def create_backend(model_runner):
    from oscar_sglang.backend import OscarAttnBackend

    settings, rot = load_settings(model_runner.server_args, model_runner.model_config.hf_config)
    return OscarAttnBackend(model_runner, settings, rot.key, rot.value)


def register() -> None:
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME in ATTENTION_BACKENDS:  # registered already in this process
        return
    register_attention_backend(BACKEND_NAME)(create_backend)
    add_attention_backend_choices([BACKEND_NAME])
    after, around = HookType.AFTER, HookType.AROUND
    for target, fn, kind in (
        (f"{_SA}.add_cli_args", _add_cli_args, after),
        (f"{_SA}.from_cli_args", _from_cli_args, after),
        (f"{_SA}.resolve_once", _check_before_launch, after),
        ("sglang.srt.arg_groups.attention_hook.handle_attention_backend_compatibility", _decode_only_cuda_graphs, after),
        (f"{_KVC}._build_token_to_kv_pool", _build_token_to_kv_pool, around),
        (f"{_POOLCFG}.__init__", _size_pool, after),
        (f"{_PAGED}._release_page_ids", _on_release_pages, after),
        (f"{_PAGED}.clear", _on_clear, after),
        (f"{_TOKEN}.free", _on_free_tokens, after),
        (f"{_TOKEN}.clear", _on_clear, after),
    ):
        HookRegistry.register(target, fn, kind)
    health.register(HookRegistry, after)
