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

import msgspec

from oscar_sglang import health
from oscar_sglang.kernels.codec import CacheLayout
from oscar_sglang.settings import BACKEND_NAME, OscarError, is_enabled, load_settings
from oscar_sglang.windows import oscar_cell_size, plan_for, plan_windows, window_row_bytes

logger = logging.getLogger(__name__)

_SA = "sglang.srt.server_args.ServerArgs"
_KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_POOLCFG = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
_PAGED = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator"
_TOKEN = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator"

_COMMON = "sglang.srt.mem_cache.common"
_REQS = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool"

HOOKED_TARGETS = (
    f"{_SA}.add_cli_args",
    f"{_SA}.from_cli_args",
    f"{_SA}.resolve_once",
    "sglang.srt.arg_groups.attention_hook.handle_attention_backend_compatibility",
    f"{_KVC}._build_token_to_kv_pool",
    f"{_KVC}.resolve_max_num_reqs",
    f"{_POOLCFG}.__init__",
    f"{_POOLCFG}.calculate_pool_sizes",
    f"{_PAGED}._release_page_ids",
    f"{_PAGED}.clear",
    f"{_TOKEN}.free",
    f"{_TOKEN}.clear",
    f"{_REQS}.free_rows",
    f"{_COMMON}.match_kv_cache",
    f"{_COMMON}.release_kv_cache",
    "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend",
    *health.HOOKED_TARGETS,
)
_PLAN_ATTR = "_oscar_window_plan"  # on the ModelConfig of the KVCacheConfigurator: the plan its sizing chose
_POOL_ATTR = "_oscar_kv_pool"  # on the ReqToTokenPool: the OSCAR pool whose request windows its rows own
_SNAPSHOT_ATTR = "_oscar_snapshot_at"  # on a Req: the cached prefix end whose window it recomputes


# ------------------------------------------------------------------- CLI flag
def _add_cli_args(result, parser: argparse.ArgumentParser):
    parser.add_argument(
        "--oscar",
        metavar="ROTATIONS",
        default=None,
        help="Serve with the OSCAR rotated 2-4-bit KV cache using this rotations file "
        "(from `python -m oscar_sglang.calib`; it holds the bit widths). Same as --attention-backend oscar "
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
def _window_args(kvc, settings) -> dict:
    """The window geometry (``windows.plan_windows`` keywords) of this rank's pool."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return dict(sink=settings.sink, recent=settings.recent, head_dim=settings.head_dim,
                kv_heads=kvc.model_config.get_num_kv_heads(parallel.attn_tp_size, parallel.attn_dcp_size),
                layers=kvc.layer_info.num_effective_layers, itemsize=kvc.model_config.dtype.itemsize)


def _build_token_to_kv_pool(original, kvc, *, sizes, is_dsa_model, is_dsv4_model, req_to_token_pool):
    if not is_enabled(kvc.server_args):
        return original(kvc, sizes=sizes, is_dsa_model=is_dsa_model, is_dsv4_model=is_dsv4_model,
                        req_to_token_pool=req_to_token_pool)
    from sglang.srt.runtime_context import get_exec

    from oscar_sglang.pool import OscarKVPool

    if kvc.use_mla_backend or is_dsa_model or is_dsv4_model:
        raise OscarError("--oscar cannot serve MLA/DSA models: they have no per-head K/V to rotate.")
    if kvc.is_hybrid_swa or kvc.mambaish_config is not None:
        raise OscarError("--oscar serves full-attention models only (this one is hybrid SWA/linear/mamba).")
    settings, _ = load_settings(kvc.server_args, kvc.model_config.hf_config)
    args = _window_args(kvc, settings)
    # one request window per row of the table sglang built (row 0 is its padding row)
    plan = plan_for(args["sink"], args["recent"], window_row_bytes(**args), req_to_token_pool.req_to_token.shape[0] - 1)
    chosen = getattr(kvc.model_config, _PLAN_ATTR, None)
    if chosen is not None and chosen.retained_sets > plan.retained_sets:
        plan = msgspec.structs.replace(plan, retained_sets=chosen.retained_sets)
    pool = OscarKVPool(
        sizes.max_total_num_tokens,
        kvc.pool_page_size,
        kvc.model_config.dtype,
        args["kv_heads"],
        kvc.model_config.head_dim,
        args["layers"],
        kvc.device,
        layouts=settings.layouts,
        plan=plan,
        enable_memory_saver=get_exec().features.enable_memory_saver,
        start_layer=kvc.layer_info.start_layer,
        end_layer=kvc.layer_info.end_layer,
    )
    setattr(req_to_token_pool, _POOL_ATTR, pool)
    logger.info(
        "OSCAR KV pool: %d tokens, %.3f bits per element (K bits %s, V bits %s); BF16 windows %d+%d for %d "
        "request rows + %d retained prefix ends (%.1f MiB)", sizes.max_total_num_tokens,
        settings.layouts.bits_per_element, _widths(settings.key_bits), _widths(settings.value_bits),
        settings.sink, settings.recent,
        plan.request_rows, plan.retained_sets, pool.window_bytes() / 2**20,
    )
    return pool


def _widths(bits: tuple[int, ...]) -> str:
    """``2`` when uniform, else the per-layer list."""
    return str(bits[0]) if len(set(bits)) == 1 else ",".join(map(str, bits))


def _size_cells(result, poolcfg, kvc):
    """Charge the true bytes per token (packed rows); the windows are charged in ``_size_pool``."""
    if not is_enabled(kvc.server_args) or poolcfg._cell_size == 0:
        return
    settings, _ = load_settings(kvc.server_args, kvc.model_config.hf_config)
    args = _window_args(kvc, settings)
    lay, first = settings.layouts, kvc.layer_info.start_layer
    span = slice(first, first + args["layers"])  # this rank's layers (pipeline parallel)
    rank = CacheLayout(lay.key[span], lay.value[span])
    poolcfg._cell_size = oscar_cell_size(rank.token_row_bytes, args["kv_heads"])
    poolcfg._oscar_window_args, poolcfg._oscar_kvc = args, kvc


def _size_pool(original, poolcfg, available_bytes: int, page_size: int):
    """Take the BF16 windows (``windows.plan_windows``) out of the KV budget before sglang sizes the pool."""
    args = getattr(poolcfg, "_oscar_window_args", None)
    if args is None:
        return original(poolcfg, available_bytes, page_size)
    kvc = poolcfg._oscar_kvc
    budget = max(available_bytes - poolcfg._fixed_overhead_bytes, 0)
    cap = kvc.server_args.max_total_tokens  # a capped pool: the windows' shares follow the cap
    running = kvc.server_args.max_running_requests
    plan = plan_windows(**args, budget_bytes=budget, max_running_requests=running,
                        share_of=min(budget, cap * poolcfg._cell_size) if cap else None)
    setattr(kvc.model_config, _PLAN_ATTR, plan)
    logger.info("OSCAR windows: %d running requests (%s), %d retained prefix ends: %.1f MiB = %.1f%% of the "
                "%.1f MiB KV budget", plan.max_running_requests, "--max-running-requests" if running else "derived",
                plan.retained_sets, plan.total_bytes / 2**20, 100 * plan.total_bytes / max(budget, 1), budget / 2**20)
    return original(poolcfg, available_bytes - plan.total_bytes, page_size)


def _cap_running_requests(original, kvc, token_capacity: int) -> int:
    """sglang's running-request count never exceeds the window plan's."""
    result = original(kvc, token_capacity)
    plan = getattr(kvc.model_config, _PLAN_ATTR, None)
    return result if plan is None else min(result, plan.max_running_requests)


# ------------------------------------------------------- prefix hits
def _match_with_windows(original, req, tree_cache, token_ids=None, *, cow_mamba=False, max_prefix_len=None):
    """A prefix hit is used only up to where the retained store holds the window a query there
    reads (``OscarKVPool.usable_prefix``): beyond it the tokens are recomputed, which under the
    position rule gives exactly what a cold run gives. The request then stores the window at
    the full match point, so the next request that leaves the cache there hits all of it."""
    result = original(req, tree_cache, token_ids, cow_mamba=cow_mamba, max_prefix_len=max_prefix_len)
    pool = _oscar_pool(tree_cache.token_to_kv_pool_allocator)
    setattr(req, _SNAPSHOT_ATTR, None)
    if pool is None or req.prefix_len == 0:
        return result
    usable = pool.usable_prefix(tree_cache.prefix_device_indices(req), getattr(tree_cache, "page_size", 1))
    if usable < req.prefix_len:
        setattr(req, _SNAPSHOT_ATTR, req.prefix_len)
        limit = usable if max_prefix_len is None else min(usable, max_prefix_len)
        result = original(req, tree_cache, token_ids, cow_mamba=cow_mamba, max_prefix_len=limit)
    return result


def _plan_snapshots(result, batch):
    """Tell the pool which request rows recompute a cached window (their rows exist now)."""
    pool = _oscar_pool(batch.token_to_kv_pool_allocator)
    if pool is None:
        return
    for req in batch.reqs:
        at = getattr(req, _SNAPSHOT_ATTR, None)
        if at is not None and req.kv.req_pool_idx is not None:
            pool.snapshot_at[req.kv.req_pool_idx] = at
            setattr(req, _SNAPSHOT_ATTR, None)


def _release_kv(original, req, tree_cache, *, checkpoint: bool):
    """Before sglang caches a request: keep its window at the cached end in the store, and hand
    the rows of tokens the tree already holds (their slots in the request are freed as duplicates)
    to the tree's slots."""
    pool = _oscar_pool(tree_cache.token_to_kv_pool_allocator)
    if pool is not None and checkpoint and req.kv.holds_kv and not req.skip_radix_cache_insert:
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
        from sglang.srt.mem_cache.common import _req_radix_key

        n = req.owned_kv_len()
        own = tree_cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :n]
        pool.retain_request(req.kv.req_pool_idx, own)
        key = _req_radix_key(tree_cache, req, req.origin_input_ids + req.output_ids, n)
        match = tree_cache.match_prefix(MatchPrefixParams(key=key))
        held = tree_cache.path_device_indices(match.last_device_node)[: match.device_prefix_len]
        pool.move_retained(own[: held.numel()], held)
    return original(req, tree_cache, checkpoint=checkpoint)


def _on_free_request_rows(result, req_to_token_pool, indices):
    pool = getattr(req_to_token_pool, _POOL_ATTR, None)
    if pool is not None:
        for row in indices:
            pool.release_request(int(row))


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
        (f"{_KVC}.resolve_max_num_reqs", _cap_running_requests, around),
        (f"{_POOLCFG}.__init__", _size_cells, after),
        (f"{_POOLCFG}.calculate_pool_sizes", _size_pool, around),
        (f"{_PAGED}._release_page_ids", _on_release_pages, after),
        (f"{_PAGED}.clear", _on_clear, after),
        (f"{_TOKEN}.free", _on_free_tokens, after),
        (f"{_TOKEN}.clear", _on_clear, after),
        (f"{_REQS}.free_rows", _on_free_request_rows, after),
        (f"{_COMMON}.match_kv_cache", _match_with_windows, around),
        (f"{_COMMON}.release_kv_cache", _release_kv, around),
        ("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend", _plan_snapshots, after),
    ):
        HookRegistry.register(target, fn, kind)
    health.register(HookRegistry, after)
